//! QueryRoute and QueryAssignment: a topic's queues, all on this broker
//! (or, in a broker group, on its leader).

use halfmq_proto::rocketmq as rmq;

use super::convert::{endpoints, name_of, ACCEPTED_TYPES, BROKER_NAME};
use super::{ok, status, Caller, RocketMq};
use crate::auth::policy::{Action, Resource};
use crate::error::BrokerError;

impl RocketMq {
    /// The endpoints a route points at: the leader's address when this
    /// member is a follower, else the address the client reached this
    /// broker at (so that it keeps one connection), else `listen`.
    fn route_endpoints(&self, asked: Option<rmq::Endpoints>) -> rmq::Endpoints {
        if let Err(BrokerError::NotLeader(Some(leader))) = self.broker.check_serving() {
            return endpoints(&leader);
        }
        match asked {
            Some(e) if !e.addresses.is_empty() => e,
            _ => endpoints(&self.advertised()),
        }
    }

    /// The queues of `topic`, creating it when `auto_create_topics` is on
    /// and the caller may publish to it.
    async fn queues(&self, c: &Caller, topic: &str, rpc: &str) -> Result<u32, BrokerError> {
        crate::core::names::check_topic(topic)?;
        self.allow_any(c, &[Action::Pub, Action::Sub], Resource::Topic(topic), rpc)?;
        if let Some(t) = self.broker.topic(topic) {
            return Ok(t.queues);
        }
        if !self.broker.config().auto_create_topics
            || self
                .allow(c, Action::Pub, Resource::Topic(topic), rpc)
                .is_err()
        {
            return Err(BrokerError::TopicNotFound(topic.to_owned()));
        }
        match self.broker.create_topic_everywhere(topic, 0).await {
            Ok(()) | Err(BrokerError::TopicExists(_)) => self
                .broker
                .topic(topic)
                .map(|t| t.queues)
                .ok_or_else(|| BrokerError::TopicNotFound(topic.to_owned())),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn route(
        &self,
        c: &Caller,
        r: rmq::QueryRouteRequest,
    ) -> rmq::QueryRouteResponse {
        if let Some(s) = c.unauthenticated() {
            return rmq::QueryRouteResponse {
                status: s,
                message_queues: Vec::new(),
            };
        }
        let found = match name_of(r.topic.as_ref(), "topic") {
            Ok(t) => self.queues(c, &t, "QueryRoute").await.map(|n| (t, n)),
            Err(e) => Err(e),
        };
        match found {
            Ok((topic, n)) => {
                tracing::debug!(topic, queues = n, "RocketMQ route");
                let broker = rmq::Broker {
                    name: BROKER_NAME.into(),
                    id: 0,
                    endpoints: Some(self.route_endpoints(r.endpoints)),
                };
                rmq::QueryRouteResponse {
                    status: ok(),
                    message_queues: (0..n)
                        .map(|id| rmq::MessageQueue {
                            topic: r.topic.clone(),
                            id: i32::try_from(id).unwrap_or(i32::MAX),
                            permission: rmq::Permission::ReadWrite as i32,
                            broker: Some(broker.clone()),
                            accept_message_types: ACCEPTED_TYPES
                                .iter()
                                .map(|t| *t as i32)
                                .collect(),
                        })
                        .collect(),
                }
            }
            Err(e) => rmq::QueryRouteResponse {
                status: status(&e),
                message_queues: Vec::new(),
            },
        }
    }

    /// A push consumer's assignment: one queue of the topic. A receive
    /// reads every queue of the topic (the core leases across them), so one
    /// long poll per consumer is enough.
    pub(super) async fn assignment(
        &self,
        c: &Caller,
        r: rmq::QueryAssignmentRequest,
    ) -> rmq::QueryAssignmentResponse {
        if let Some(s) = c.unauthenticated() {
            return rmq::QueryAssignmentResponse {
                status: s,
                assignments: Vec::new(),
            };
        }
        let checked = async {
            let t = name_of(r.topic.as_ref(), "topic")?;
            let g = name_of(r.group.as_ref(), "group")?;
            crate::core::names::check_group(&g)?;
            self.allow(c, Action::Sub, Resource::Group(&g), "QueryAssignment")?;
            self.queues(c, &t, "QueryAssignment").await
        }
        .await;
        match checked {
            Ok(_) => rmq::QueryAssignmentResponse {
                status: ok(),
                assignments: vec![rmq::Assignment {
                    message_queue: Some(rmq::MessageQueue {
                        topic: r.topic,
                        id: 0,
                        permission: rmq::Permission::ReadWrite as i32,
                        broker: Some(rmq::Broker {
                            name: BROKER_NAME.into(),
                            id: 0,
                            endpoints: Some(self.route_endpoints(r.endpoints)),
                        }),
                        accept_message_types: ACCEPTED_TYPES.iter().map(|t| *t as i32).collect(),
                    }),
                }],
            },
            Err(e) => rmq::QueryAssignmentResponse {
                status: status(&e),
                assignments: Vec::new(),
            },
        }
    }
}
