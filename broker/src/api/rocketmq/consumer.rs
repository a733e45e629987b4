//! ReceiveMessage (long polling), AckMessage, ChangeInvisibleDuration and
//! ForwardMessageToDeadLetterQueue. Receipt handles are halfmq's own:
//! opaque, bound to the consumer group, and stale after an ack or a new
//! invisible duration (INVALID_RECEIPT_HANDLE).

use std::sync::Arc;

use halfmq_proto::rocketmq as rmq;

use super::convert::{duration_ms, name_of, timestamp, wire_message};
use super::{ok, status, status_of, Caller, ReceiveStream, RocketMq};
use crate::auth::policy::{Action, Resource};
use crate::core::types::{Receipt, ReceiveRequest};
use crate::error::BrokerError;

/// A receive ends this long before the client's deadline, ms, so that its
/// answer arrives in time.
const DEADLINE_MARGIN_MS: u64 = 2_000;

/// Messages per receive when the client asks for none.
const DEFAULT_BATCH: u32 = 32;

/// The client's deadline from the `grpc-timeout` header, ms.
pub(super) fn grpc_timeout_ms(md: &tonic::metadata::MetadataMap) -> Option<u64> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => n.saturating_mul(3_600_000),
        "M" => n.saturating_mul(60_000),
        "S" => n.saturating_mul(1_000),
        "m" => n,
        "u" => n / 1_000,
        "n" => n / 1_000_000,
        _ => return None,
    })
}

/// A filter expression as a halfmq tag expression.
///
/// # Errors
/// [`BrokerError::InvalidTagExpression`] for SQL92 filters (not served).
fn tag_expression(f: Option<&rmq::FilterExpression>) -> Result<String, BrokerError> {
    let Some(f) = f else {
        return Ok("*".into());
    };
    if f.r#type == rmq::FilterType::Sql as i32 {
        return Err(BrokerError::InvalidTagExpression(
            "SQL92 filters are not served: use a tag expression".into(),
        ));
    }
    let e = f.expression.trim();
    Ok(if e.is_empty() {
        "*".into()
    } else {
        e.to_owned()
    })
}

fn one(
    content: rmq::receive_message_response::Content,
) -> Result<rmq::ReceiveMessageResponse, tonic::Status> {
    Ok(rmq::ReceiveMessageResponse {
        content: Some(content),
    })
}

impl RocketMq {
    fn receive_request(
        &self,
        c: &Caller,
        r: &rmq::ReceiveMessageRequest,
        deadline_ms: Option<u64>,
    ) -> Result<ReceiveRequest, BrokerError> {
        let group = name_of(r.group.as_ref(), "group")?;
        let topic = name_of(
            r.message_queue.as_ref().and_then(|q| q.topic.as_ref()),
            "message_queue.topic",
        )?;
        crate::core::names::check_group(&group)?;
        crate::core::names::check_topic(&topic)?;
        self.allow(c, Action::Sub, Resource::Group(&group), "ReceiveMessage")?;
        self.allow(c, Action::Sub, Resource::Topic(&topic), "ReceiveMessage")?;
        let cfg = self.broker.config();
        let asked_wait = r
            .long_polling_timeout
            .as_ref()
            .map_or(cfg.max_receive_wait_ms, duration_ms);
        let mut wait_ms = asked_wait.min(cfg.max_receive_wait_ms);
        if let Some(d) = deadline_ms {
            wait_ms = wait_ms.min(d.saturating_sub(DEADLINE_MARGIN_MS));
        }
        let batch = u32::try_from(r.batch_size).unwrap_or(0);
        Ok(ReceiveRequest {
            group,
            topic,
            tag_expression: tag_expression(r.filter_expression.as_ref())?,
            max_messages: if batch == 0 { DEFAULT_BATCH } else { batch }
                .min(cfg.max_receive_messages),
            invisible_duration_ms: r.invisible_duration.as_ref().map_or(0, duration_ms),
            wait_ms,
        })
    }

    /// Answers at once (the response headers), then long-polls in a task:
    /// `OK` and the messages, or `MESSAGE_NOT_FOUND` alone when none came;
    /// then the stream ends.
    pub(super) fn receive(
        &self,
        c: Caller,
        r: rmq::ReceiveMessageRequest,
        deadline_ms: Option<u64>,
    ) -> ReceiveStream {
        use rmq::receive_message_response::Content;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let req = match c.unauthenticated() {
            Some(s) => Err(s),
            None => self
                .receive_request(&c, &r, deadline_ms)
                .map_err(|e| status(&e)),
        };
        let broker = Arc::clone(&self.broker);
        let renewals = r.auto_renew.then(|| Arc::clone(&self.renewals));
        let topic_resource = r.message_queue.and_then(|q| q.topic);
        let store_host = self.advertised();
        tokio::spawn(async move {
            let req = match req {
                Ok(req) => req,
                Err(s) => {
                    let _ = tx.send(one(Content::Status(s.unwrap_or_default()))).await;
                    return;
                }
            };
            let group = req.group.clone();
            match broker.receive(req).await {
                Ok(msgs) if msgs.is_empty() => {
                    let s = status_of(rmq::Code::MessageNotFound, "no new message");
                    let _ = tx.send(one(Content::Status(s.unwrap_or_default()))).await;
                }
                Ok(msgs) => {
                    let now = broker.now_ms();
                    if tx
                        .send(one(Content::Status(ok().unwrap_or_default())))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    // Python's push consumer measures its wait from this.
                    let _ = tx
                        .send(one(Content::DeliveryTimestamp(timestamp(now))))
                        .await;
                    for m in msgs {
                        let handle = m.receipt.handle(&group, broker.secret());
                        if let Some(rn) = &renewals {
                            rn.add(
                                &group,
                                &handle,
                                m.receipt.clone(),
                                m.invisible_until_ms,
                                now,
                            );
                        }
                        let mut w = wire_message(
                            m,
                            Some(handle),
                            rmq::MessageType::Normal,
                            &store_host,
                            now,
                        );
                        if topic_resource.is_some() {
                            w.topic.clone_from(&topic_resource);
                        }
                        if tx.send(one(Content::Message(w))).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(one(Content::Status(status(&e).unwrap_or_default())))
                        .await;
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    /// The receipt a handle of `group` names now: the current one of an
    /// auto-renewed delivery (which stops being renewed), else the
    /// handle's own.
    fn receipt(&self, group: &str, handle: &str) -> Result<Receipt, BrokerError> {
        match self.renewals.take(group, handle) {
            Some(r) => Ok(r),
            None => Receipt::from_handle(handle, group, self.broker.secret()),
        }
    }

    pub(super) fn ack(&self, c: &Caller, r: rmq::AckMessageRequest) -> rmq::AckMessageResponse {
        let checked = match c.unauthenticated() {
            Some(s) => Err(s),
            None => name_of(r.group.as_ref(), "group")
                .and_then(|g| {
                    self.allow(c, Action::Sub, Resource::Group(&g), "AckMessage")?;
                    Ok(g)
                })
                .map_err(|e| status(&e)),
        };
        let group = match checked {
            Ok(g) => g,
            Err(s) => {
                return rmq::AckMessageResponse {
                    entries: r
                        .entries
                        .into_iter()
                        .map(|e| rmq::AckMessageResultEntry {
                            message_id: e.message_id,
                            receipt_handle: e.receipt_handle,
                            status: s.clone(),
                        })
                        .collect(),
                    status: s,
                }
            }
        };
        let mut first_error = None;
        let entries: Vec<rmq::AckMessageResultEntry> = r
            .entries
            .into_iter()
            .map(|e| {
                let res = self
                    .receipt(&group, &e.receipt_handle)
                    .and_then(|rc| self.broker.ack(&group, &rc));
                let st = match res {
                    Ok(()) => ok(),
                    Err(err) => {
                        let s = status(&err);
                        first_error.get_or_insert_with(|| s.clone());
                        s
                    }
                };
                rmq::AckMessageResultEntry {
                    message_id: e.message_id,
                    receipt_handle: e.receipt_handle,
                    status: st,
                }
            })
            .collect();
        rmq::AckMessageResponse {
            status: first_error.unwrap_or_else(ok),
            entries,
        }
    }

    pub(super) fn change_invisible(
        &self,
        c: &Caller,
        r: rmq::ChangeInvisibleDurationRequest,
    ) -> rmq::ChangeInvisibleDurationResponse {
        if let Some(s) = c.unauthenticated() {
            return rmq::ChangeInvisibleDurationResponse {
                status: s,
                receipt_handle: String::new(),
            };
        }
        let changed = name_of(r.group.as_ref(), "group").and_then(|g| {
            self.allow(
                c,
                Action::Sub,
                Resource::Group(&g),
                "ChangeInvisibleDuration",
            )?;
            let rc = self.receipt(&g, &r.receipt_handle)?;
            let ms = r.invisible_duration.as_ref().map_or(0, duration_ms);
            let (next, _) = self.broker.change_invisible_duration(&g, &rc, ms)?;
            Ok(next.handle(&g, self.broker.secret()))
        });
        match changed {
            Ok(h) => rmq::ChangeInvisibleDurationResponse {
                status: ok(),
                receipt_handle: h,
            },
            Err(e) => rmq::ChangeInvisibleDurationResponse {
                status: status(&e),
                receipt_handle: String::new(),
            },
        }
    }

    pub(super) async fn forward_to_dlq(
        &self,
        c: &Caller,
        r: rmq::ForwardMessageToDeadLetterQueueRequest,
    ) -> rmq::ForwardMessageToDeadLetterQueueResponse {
        if let Some(s) = c.unauthenticated() {
            return rmq::ForwardMessageToDeadLetterQueueResponse { status: s };
        }
        let moved = async {
            let g = name_of(r.group.as_ref(), "group")?;
            self.allow(
                c,
                Action::Sub,
                Resource::Group(&g),
                "ForwardMessageToDeadLetterQueue",
            )?;
            let rc = self.receipt(&g, &r.receipt_handle)?;
            let reason = format!(
                "forwarded by the consumer after {} of {} delivery attempts",
                r.delivery_attempt, r.max_delivery_attempts
            );
            self.broker.dead_letter(&g, &rc, &reason).await
        }
        .await;
        rmq::ForwardMessageToDeadLetterQueueResponse {
            status: match moved {
                Ok(()) => ok(),
                Err(e) => status(&e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_in_ms() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout_ms(&md), None);
        md.insert("grpc-timeout", "40S".parse().unwrap());
        assert_eq!(grpc_timeout_ms(&md), Some(40_000));
        md.insert("grpc-timeout", "2999m".parse().unwrap());
        assert_eq!(grpc_timeout_ms(&md), Some(2_999));
        md.insert("grpc-timeout", "5000000u".parse().unwrap());
        assert_eq!(grpc_timeout_ms(&md), Some(5_000));
        md.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout_ms(&md), None);
    }

    #[test]
    fn sql_filters_are_refused() {
        let sql = rmq::FilterExpression {
            r#type: rmq::FilterType::Sql as i32,
            expression: "a > 1".into(),
        };
        assert!(tag_expression(Some(&sql)).is_err());
        let tag = rmq::FilterExpression {
            r#type: rmq::FilterType::Tag as i32,
            expression: " a||b ".into(),
        };
        assert_eq!(tag_expression(Some(&tag)).unwrap(), "a||b");
        assert_eq!(tag_expression(None).unwrap(), "*");
    }
}
