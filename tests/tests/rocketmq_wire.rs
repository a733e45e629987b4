//! The RocketMQ edge at the wire, without the official clients: what a
//! hostile or broken client gets (in-body codes, nothing stored), and
//! `rocketmq_enabled = false`.

use halfmq_proto::rocketmq as rmq;
use halfmq_tests::{start, test_config};
use rmq::messaging_service_client::MessagingServiceClient;

type Rmq = MessagingServiceClient<tonic::transport::Channel>;

async fn connect(addr: std::net::SocketAddr) -> Rmq {
    MessagingServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn topic(name: &str) -> Option<rmq::Resource> {
    Some(rmq::Resource {
        resource_namespace: String::new(),
        name: name.into(),
    })
}

fn message(t: &str, id: &str, body: &[u8]) -> rmq::Message {
    rmq::Message {
        topic: topic(t),
        user_properties: Default::default(),
        system_properties: Some(rmq::SystemProperties {
            message_id: id.into(),
            message_type: rmq::MessageType::Normal as i32,
            queue_id: 0,
            ..Default::default()
        }),
        body: bytes::Bytes::copy_from_slice(body),
    }
}

fn code(s: &Option<rmq::Status>) -> i32 {
    s.as_ref().map_or(0, |s| s.code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_in_body_codes_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let mut c = connect(b.addr).await;
    // A route of a bad or namespaced topic.
    let r = c
        .query_route(rmq::QueryRouteRequest {
            topic: topic("no.dots"),
            endpoints: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r.status), rmq::Code::IllegalTopic as i32);
    assert!(r.message_queues.is_empty());
    let ns = rmq::QueryRouteRequest {
        topic: Some(rmq::Resource {
            resource_namespace: "prod".into(),
            name: "t".into(),
        }),
        endpoints: None,
    };
    let r = c.query_route(ns).await.unwrap().into_inner();
    assert_eq!(code(&r.status), rmq::Code::BadRequest as i32);
    // A good route: every queue, on this broker, read-write.
    let r = c
        .query_route(rmq::QueryRouteRequest {
            topic: topic("wire"),
            endpoints: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r.status), rmq::Code::Ok as i32);
    assert_eq!(r.message_queues.len(), 4);
    let ep = r.message_queues[0]
        .broker
        .as_ref()
        .unwrap()
        .endpoints
        .as_ref()
        .unwrap();
    assert_eq!(ep.addresses[0].port, i32::from(b.addr.port()));
    // A send without a message id, with a GZIP body, with an oversized
    // body, to a queue that does not exist: refused, one entry per message.
    let mut gzip = message("wire", "01A", b"x");
    if let Some(sp) = gzip.system_properties.as_mut() {
        sp.body_encoding = rmq::Encoding::Gzip as i32;
    }
    let mut bad_queue = message("wire", "01B", b"x");
    if let Some(sp) = bad_queue.system_properties.as_mut() {
        sp.queue_id = 99;
    }
    let big = vec![b'x'; 64 * 1024 + 1];
    for (m, want) in [
        (message("wire", "", b"x"), rmq::Code::BadRequest),
        (gzip, rmq::Code::BadRequest),
        (message("wire", "01C", &big), rmq::Code::MessageBodyTooLarge),
        (bad_queue, rmq::Code::BadRequest),
    ] {
        let r = c
            .send_message(rmq::SendMessageRequest { messages: vec![m] })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(code(&r.status), want as i32, "{r:?}");
        assert_eq!(r.entries.len(), 1);
    }
    // A forged receipt handle, a stale one.
    let ack = |h: &str| rmq::AckMessageRequest {
        group: topic("g"),
        topic: topic("wire"),
        entries: vec![rmq::AckMessageEntry {
            message_id: "01A".into(),
            receipt_handle: h.into(),
        }],
    };
    let r = c.ack_message(ack("forged")).await.unwrap().into_inner();
    assert_eq!(code(&r.status), rmq::Code::InvalidReceiptHandle as i32);
    assert_eq!(r.entries.len(), 1);
    // Nothing was stored: an empty receive answers MESSAGE_NOT_FOUND.
    let mut s = c
        .receive_message(rmq::ReceiveMessageRequest {
            group: topic("g"),
            message_queue: Some(rmq::MessageQueue {
                topic: topic("wire"),
                ..Default::default()
            }),
            batch_size: 8,
            long_polling_timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 200_000_000,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut items = Vec::new();
    while let Some(x) = s.message().await.unwrap() {
        items.push(x);
    }
    assert_eq!(items.len(), 1, "{items:?}");
    match &items[0].content {
        Some(rmq::receive_message_response::Content::Status(st)) => {
            assert_eq!(st.code, rmq::Code::MessageNotFound as i32)
        }
        other => panic!("{other:?}"),
    }
    // A good send is stored once, its id returned, a repeat deduplicated.
    for _ in 0..2 {
        let r = c
            .send_message(rmq::SendMessageRequest {
                messages: vec![message("wire", "01GOOD", b"ok")],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(code(&r.status), rmq::Code::Ok as i32);
        assert_eq!(r.entries[0].message_id, "01GOOD");
    }
    let stats = halfmq_client::Admin::new(
        halfmq_client::Client::connect(&b.addr.to_string())
            .await
            .unwrap(),
    )
    .stats()
    .await
    .unwrap();
    assert_eq!(stats.messages_in, 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocketmq_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        rocketmq_enabled: false,
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let mut c = connect(b.addr).await;
    let e = c
        .query_route(rmq::QueryRouteRequest {
            topic: topic("t"),
            endpoints: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
}
