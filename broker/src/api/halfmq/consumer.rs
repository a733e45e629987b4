//! The `Consumer` service: receive (long polling), ack, nack, invisible
//! durations.

use halfmq_proto::v1 as pb;
use tonic::{Request, Response};

use super::{ok, status, who, wire_message, Rpc, Services};
use crate::auth::policy::{Action, Resource};
use crate::core::types::{Receipt, ReceiveRequest};

#[tonic::async_trait]
impl pb::consumer_server::Consumer for Services {
    #[tracing::instrument(skip_all, fields(group = %req.get_ref().group, topic = %req.get_ref().topic))]
    async fn receive(&self, req: Request<pb::ReceiveRequest>) -> Rpc<pb::ReceiveResponse> {
        let w = who(&req);
        let r = req.into_inner();
        self.allow(
            w.as_ref(),
            Action::Sub,
            Resource::Group(&r.group),
            "Receive",
        )?;
        self.allow(
            w.as_ref(),
            Action::Sub,
            Resource::Topic(&r.topic),
            "Receive",
        )?;
        let group = r.group.clone();
        let res = self
            .broker
            .receive(ReceiveRequest {
                group: r.group,
                topic: r.topic,
                tag_expression: r.tag_expression,
                max_messages: r.max_messages,
                invisible_duration_ms: r.invisible_duration_ms,
                wait_ms: r.wait_ms,
            })
            .await;
        Ok(Response::new(match res {
            Ok(msgs) => pb::ReceiveResponse {
                status: ok(),
                messages: msgs
                    .into_iter()
                    .map(|m| {
                        let handle = m.receipt.handle(&group, self.broker.secret());
                        wire_message(m, handle)
                    })
                    .collect(),
            },
            Err(e) => pb::ReceiveResponse {
                status: status(&e),
                messages: vec![],
            },
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().group, handles = req.get_ref().receipt_handles.len()))]
    async fn ack(&self, req: Request<pb::AckRequest>) -> Rpc<pb::AckResponse> {
        let w = who(&req);
        let r = req.into_inner();
        self.allow(w.as_ref(), Action::Sub, Resource::Group(&r.group), "Ack")?;
        let results = r
            .receipt_handles
            .iter()
            .map(|h| {
                match Receipt::from_handle(h, &r.group, self.broker.secret())
                    .and_then(|rc| self.broker.ack(&r.group, &rc))
                {
                    Ok(()) => ok().unwrap_or_default(),
                    Err(e) => status(&e).unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(pb::AckResponse {
            status: ok(),
            results,
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().group))]
    async fn nack(&self, req: Request<pb::NackRequest>) -> Rpc<pb::NackResponse> {
        let w = who(&req);
        let r = req.into_inner();
        self.allow(w.as_ref(), Action::Sub, Resource::Group(&r.group), "Nack")?;
        let res = match Receipt::from_handle(&r.receipt_handle, &r.group, self.broker.secret()) {
            Ok(rc) => self.broker.nack(&r.group, &rc, &r.reason, r.delay_ms).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::NackResponse {
            status: match res {
                Ok(()) => ok(),
                Err(e) => status(&e),
            },
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().group))]
    async fn change_invisible_duration(
        &self,
        req: Request<pb::ChangeInvisibleDurationRequest>,
    ) -> Rpc<pb::ChangeInvisibleDurationResponse> {
        let w = who(&req);
        let r = req.into_inner();
        self.allow(
            w.as_ref(),
            Action::Sub,
            Resource::Group(&r.group),
            "ChangeInvisibleDuration",
        )?;
        let res = Receipt::from_handle(&r.receipt_handle, &r.group, self.broker.secret()).and_then(
            |rc| {
                self.broker
                    .change_invisible_duration(&r.group, &rc, r.invisible_duration_ms)
            },
        );
        Ok(Response::new(match res {
            Ok((rc, until)) => pb::ChangeInvisibleDurationResponse {
                status: ok(),
                receipt_handle: rc.handle(&r.group, self.broker.secret()),
                invisible_until_ms: until,
            },
            Err(e) => pb::ChangeInvisibleDurationResponse {
                status: status(&e),
                ..Default::default()
            },
        }))
    }
}
