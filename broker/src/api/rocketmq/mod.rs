//! The RocketMQ 5 edge: `apache.rocketmq.v2.MessagingService`, on the same
//! listener as `halfmq.v1` (tonic routes by service path), so that the
//! official RocketMQ 5 clients work against halfmq unmodified. It converts
//! to and from the same broker core as the halfmq edge; no RocketMQ type
//! crosses into the core.
//!
//! # Layout
//! - this module: [`RocketMq`] (the service), status codes ([`code_of`]),
//!   the caller of a request (user, client id).
//! - `convert`: wire messages to domain types and back.
//! - `route`: QueryRoute, QueryAssignment, Heartbeat, NotifyClientTermination.
//! - `producer`: SendMessage, EndTransaction.
//! - `consumer`: ReceiveMessage, AckMessage, ChangeInvisibleDuration,
//!   ForwardMessageToDeadLetterQueue.
//! - `telemetry`: the Telemetry stream (Settings; check-backs as
//!   RecoverOrphanedTransactionCommand) and the live clients.
//! - `renew`: the invisible durations of `auto_renew` deliveries.
//!
//! Every outcome travels as the in-body `Status` the clients expect; only
//! codes the oldest supported client (Rust `rocketmq` 5.0.0) knows are
//! sent (it panics on others).

mod consumer;
mod convert;
mod producer;
mod renew;
mod route;
mod telemetry;

use std::sync::Arc;

use halfmq_proto::rocketmq as rmq;
use tonic::{Request, Response};

use crate::auth::layer::Unauthenticated;
use crate::auth::policy::{Action, Resource};
use crate::auth::verify::Principal;
use crate::core::Broker;
use crate::error::BrokerError;

/// Path prefix of the RocketMQ service.
pub const PATH_PREFIX: &str = "/apache.rocketmq.v2.MessagingService/";

/// Header naming the client (RocketMQ clients send it on every call).
const CLIENT_ID_HEADER: &str = "x-mq-client-id";

/// The RocketMQ `MessagingService` over a broker.
#[derive(Debug, Clone)]
pub struct RocketMq {
    broker: Arc<Broker>,
    clients: Arc<telemetry::Clients>,
    renewals: Arc<renew::Renewals>,
    /// `HOST:PORT` routes point at when the client names no endpoint.
    advertised: Arc<str>,
}

impl RocketMq {
    /// The service over `broker`, listening at `advertised` (`HOST:PORT`).
    /// Call inside a tokio runtime: it starts the renewer of `auto_renew`
    /// deliveries, which stops when the broker shuts down.
    pub fn new(broker: Arc<Broker>, advertised: String) -> Self {
        let max = broker.config().rocketmq_max_clients as usize;
        let renewals = Arc::new(renew::Renewals::default());
        renew::spawn(Arc::clone(&renewals), Arc::clone(&broker));
        RocketMq {
            broker,
            clients: Arc::new(telemetry::Clients::new(max)),
            renewals,
            advertised: Arc::from(advertised),
        }
    }

    /// The tonic server of the service, reading requests up to
    /// `max_request_bytes` (so that the broker itself answers
    /// MESSAGE_BODY_TOO_LARGE).
    pub fn into_server(self) -> rmq::messaging_service_server::MessagingServiceServer<Self> {
        let max = self.broker.config().max_request_bytes();
        rmq::messaging_service_server::MessagingServiceServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX)
    }
}

/// The RocketMQ status code of a core error. Only codes of the Rust
/// `rocketmq` 5.0.0 client's enum (see README "Using RocketMQ clients").
pub fn code_of(e: &BrokerError) -> rmq::Code {
    use rmq::Code;
    match e {
        BrokerError::BadRequest(_) | BrokerError::Config(_) => Code::BadRequest,
        BrokerError::InvalidTopic(_) | BrokerError::ReservedName(_) => Code::IllegalTopic,
        BrokerError::InvalidGroup(_) => Code::IllegalConsumerGroup,
        BrokerError::InvalidTagExpression(_) => Code::IllegalFilterExpression,
        BrokerError::InvalidQueueId { .. } => Code::BadRequest,
        BrokerError::InvalidReceiptHandle(_) | BrokerError::ReceiptNotFound => {
            Code::InvalidReceiptHandle
        }
        BrokerError::TopicNotFound(_) => Code::TopicNotFound,
        BrokerError::InvalidTransactionId(_) | BrokerError::TransactionNotFound(_) => {
            Code::InvalidTransactionId
        }
        BrokerError::TransactionConflict(_) => Code::PreconditionFailed,
        BrokerError::TooManyPendingHalves(_)
        | BrokerError::TooManyRequests(_)
        | BrokerError::TopicBusy(_) => Code::TooManyRequests,
        BrokerError::TopicExists(_) => Code::BadRequest,
        BrokerError::MessageTooLarge { .. } => Code::MessageBodyTooLarge,
        BrokerError::BatchTooLarge(_) => Code::PayloadTooLarge,
        BrokerError::Storage(halfmq_storage::Error::RecordTooLarge { .. }) => {
            Code::MessageBodyTooLarge
        }
        BrokerError::Storage(_) | BrokerError::Internal(_) => Code::InternalServerError,
        BrokerError::ShuttingDown | BrokerError::NotLeader(_) | BrokerError::LeadershipLost(_) => {
            Code::HaNotAvailable
        }
        BrokerError::UserNotFound(_) | BrokerError::UserExists(_) => Code::BadRequest,
        BrokerError::PermissionDenied { .. } => Code::Forbidden,
    }
}

pub(super) fn ok() -> Option<rmq::Status> {
    Some(rmq::Status {
        code: rmq::Code::Ok as i32,
        message: "OK".into(),
    })
}

pub(super) fn status(e: &BrokerError) -> Option<rmq::Status> {
    let code = code_of(e);
    if code == rmq::Code::InternalServerError {
        tracing::error!(error = %e, "RocketMQ request failed");
    } else {
        tracing::debug!(error = %e, "RocketMQ request refused");
    }
    Some(rmq::Status {
        code: code as i32,
        message: e.to_string(),
    })
}

pub(super) fn status_of(code: rmq::Code, message: impl Into<String>) -> Option<rmq::Status> {
    Some(rmq::Status {
        code: code as i32,
        message: message.into(),
    })
}

/// Who sent a request: the user the auth gate found (or why it found
/// none), and the client's id.
#[derive(Debug, Clone)]
pub(super) struct Caller {
    who: Option<Principal>,
    refused: Option<String>,
    client_id: String,
}

impl Caller {
    fn of<T>(req: &Request<T>) -> Caller {
        Caller {
            who: req.extensions().get::<Principal>().cloned(),
            refused: req
                .extensions()
                .get::<Unauthenticated>()
                .map(|u| u.0.clone()),
            client_id: req
                .metadata()
                .get(CLIENT_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
        }
    }

    /// The refusal of an unauthenticated request (auth on, bad or no
    /// signature), as the status to answer.
    fn unauthenticated(&self) -> Option<Option<rmq::Status>> {
        self.refused
            .as_ref()
            .map(|m| status_of(rmq::Code::Unauthorized, m.clone()))
    }
}

impl RocketMq {
    /// Whether `c` may do `action` on `res` (always with auth off).
    ///
    /// # Errors
    /// [`BrokerError::PermissionDenied`], logged to the audit log.
    fn allow(
        &self,
        c: &Caller,
        action: Action,
        res: Resource<'_>,
        rpc: &str,
    ) -> Result<(), BrokerError> {
        crate::auth::authorize(self.broker.auth_users(), c.who.as_ref(), action, &res, rpc)
    }

    /// Whether `c` may do one of `actions` on `res`.
    ///
    /// # Errors
    /// As [`RocketMq::allow`], naming the first action.
    fn allow_any(
        &self,
        c: &Caller,
        actions: &[Action],
        res: Resource<'_>,
        rpc: &str,
    ) -> Result<(), BrokerError> {
        crate::auth::authorize_any(self.broker.auth_users(), c.who.as_ref(), actions, &res, rpc)
    }

    /// The address clients reach this broker at, for routes.
    fn advertised(&self) -> String {
        self.advertised.to_string()
    }
}

type Rpc<T> = Result<Response<T>, tonic::Status>;

type ReceiveStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<rmq::ReceiveMessageResponse, tonic::Status>> + Send>,
>;
type TelemetryStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<rmq::TelemetryCommand, tonic::Status>> + Send>,
>;

#[tonic::async_trait]
impl rmq::messaging_service_server::MessagingService for RocketMq {
    type ReceiveMessageStream = ReceiveStream;
    type TelemetryStream = TelemetryStream;

    async fn query_route(
        &self,
        req: Request<rmq::QueryRouteRequest>,
    ) -> Rpc<rmq::QueryRouteResponse> {
        let c = Caller::of(&req);
        Ok(Response::new(self.route(&c, req.into_inner()).await))
    }

    async fn heartbeat(&self, req: Request<rmq::HeartbeatRequest>) -> Rpc<rmq::HeartbeatResponse> {
        let c = Caller::of(&req);
        let status = match c.unauthenticated() {
            Some(s) => s,
            None => ok(),
        };
        Ok(Response::new(rmq::HeartbeatResponse { status }))
    }

    async fn send_message(
        &self,
        req: Request<rmq::SendMessageRequest>,
    ) -> Rpc<rmq::SendMessageResponse> {
        let c = Caller::of(&req);
        Ok(Response::new(self.send(&c, req.into_inner()).await))
    }

    async fn query_assignment(
        &self,
        req: Request<rmq::QueryAssignmentRequest>,
    ) -> Rpc<rmq::QueryAssignmentResponse> {
        let c = Caller::of(&req);
        Ok(Response::new(self.assignment(&c, req.into_inner()).await))
    }

    async fn receive_message(
        &self,
        req: Request<rmq::ReceiveMessageRequest>,
    ) -> Rpc<Self::ReceiveMessageStream> {
        let c = Caller::of(&req);
        let deadline_ms = consumer::grpc_timeout_ms(req.metadata());
        Ok(Response::new(self.receive(
            c,
            req.into_inner(),
            deadline_ms,
        )))
    }

    async fn ack_message(
        &self,
        req: Request<rmq::AckMessageRequest>,
    ) -> Rpc<rmq::AckMessageResponse> {
        let c = Caller::of(&req);
        Ok(Response::new(self.ack(&c, req.into_inner())))
    }

    async fn forward_message_to_dead_letter_queue(
        &self,
        req: Request<rmq::ForwardMessageToDeadLetterQueueRequest>,
    ) -> Rpc<rmq::ForwardMessageToDeadLetterQueueResponse> {
        let c = Caller::of(&req);
        Ok(Response::new(
            self.forward_to_dlq(&c, req.into_inner()).await,
        ))
    }

    async fn end_transaction(
        &self,
        req: Request<rmq::EndTransactionRequest>,
    ) -> Rpc<rmq::EndTransactionResponse> {
        let c = Caller::of(&req);
        Ok(Response::new(self.end(&c, req.into_inner()).await))
    }

    async fn telemetry(
        &self,
        req: Request<tonic::Streaming<rmq::TelemetryCommand>>,
    ) -> Rpc<Self::TelemetryStream> {
        let c = Caller::of(&req);
        Ok(Response::new(self.open_telemetry(c, req.into_inner())))
    }

    async fn notify_client_termination(
        &self,
        req: Request<rmq::NotifyClientTerminationRequest>,
    ) -> Rpc<rmq::NotifyClientTerminationResponse> {
        let c = Caller::of(&req);
        let status = match c.unauthenticated() {
            Some(s) => s,
            None => ok(),
        };
        Ok(Response::new(rmq::NotifyClientTerminationResponse {
            status,
        }))
    }

    async fn change_invisible_duration(
        &self,
        req: Request<rmq::ChangeInvisibleDurationRequest>,
    ) -> Rpc<rmq::ChangeInvisibleDurationResponse> {
        let c = Caller::of(&req);
        Ok(Response::new(self.change_invisible(&c, req.into_inner())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code halfmq may answer with is one the Rust 5.0.0 client
    /// knows (its enum ends at these: later codes make it panic).
    #[test]
    fn only_codes_old_clients_know() {
        let later = [40019, 40020, 40021, 40404, 41302, 42901, 42902];
        let errors = [
            BrokerError::BadRequest(String::new()),
            BrokerError::InvalidTopic(String::new()),
            BrokerError::InvalidGroup(String::new()),
            BrokerError::InvalidTagExpression(String::new()),
            BrokerError::InvalidReceiptHandle(String::new()),
            BrokerError::ReceiptNotFound,
            BrokerError::TopicNotFound(String::new()),
            BrokerError::InvalidTransactionId(String::new()),
            BrokerError::TransactionNotFound(String::new()),
            BrokerError::TransactionConflict(String::new()),
            BrokerError::TooManyRequests(String::new()),
            BrokerError::MessageTooLarge {
                size_bytes: 2,
                limit_bytes: 1,
            },
            BrokerError::BatchTooLarge(String::new()),
            BrokerError::Internal(String::new()),
            BrokerError::ShuttingDown,
            BrokerError::NotLeader(None),
            BrokerError::PermissionDenied {
                action: "pub",
                resource: String::new(),
            },
        ];
        for e in &errors {
            let c = code_of(e) as i32;
            assert!(
                (20000..=60000).contains(&c) && !later.contains(&c),
                "{e:?} -> {c}"
            );
        }
        assert_eq!(
            code_of(&BrokerError::ReceiptNotFound),
            rmq::Code::InvalidReceiptHandle
        );
        assert_eq!(
            code_of(&BrokerError::MessageTooLarge {
                size_bytes: 2,
                limit_bytes: 1
            }),
            rmq::Code::MessageBodyTooLarge
        );
    }
}
