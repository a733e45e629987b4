//! The client against a broker that predates `TransactionBatch`: a stand-in
//! `Producer` service that answers it with UNIMPLEMENTED and serves
//! `SendHalves` / `EndTransactions` as such a broker would.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use halfmq_client::{Client, Message, MessageView, TransactionProducer, TransactionResolution};
use halfmq_proto::v1 as pb;
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Calls {
    batch: AtomicU32,
    send_halves: AtomicU32,
    halves: AtomicU32,
    end_transactions: AtomicU32,
    ends: AtomicU32,
    next_offset: AtomicU64,
}

struct OldBroker(Arc<Calls>);

type Down =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::SessionDown, Status>> + Send>>;

fn ok() -> Option<pb::Status> {
    Some(pb::Status {
        code: pb::Code::Ok as i32,
        message: String::new(),
        leader: String::new(),
    })
}

#[tonic::async_trait]
impl pb::producer_server::Producer for OldBroker {
    type SessionStream = Down;

    async fn send(
        &self,
        _: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn send_half(
        &self,
        _: Request<pb::SendHalfRequest>,
    ) -> Result<Response<pb::SendHalfResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn end_transaction(
        &self,
        _: Request<pb::EndTransactionRequest>,
    ) -> Result<Response<pb::EndTransactionResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn send_halves(
        &self,
        req: Request<pb::SendHalvesRequest>,
    ) -> Result<Response<pb::SendHalvesResponse>, Status> {
        let c = &self.0;
        c.send_halves.fetch_add(1, Ordering::SeqCst);
        let n = req.into_inner().messages.len();
        c.halves.fetch_add(n as u32, Ordering::SeqCst);
        let receipts = (0..n)
            .map(|_| {
                let o = c.next_offset.fetch_add(1, Ordering::SeqCst);
                pb::HalfReceipt {
                    transaction_id: format!("{o:016x}{o:032x}"),
                    message_id: format!("{o:032x}"),
                    queue_id: 0,
                    duplicate: false,
                }
            })
            .collect();
        Ok(Response::new(pb::SendHalvesResponse {
            status: ok(),
            receipts,
        }))
    }

    async fn end_transactions(
        &self,
        req: Request<pb::EndTransactionsRequest>,
    ) -> Result<Response<pb::EndTransactionsResponse>, Status> {
        let c = &self.0;
        c.end_transactions.fetch_add(1, Ordering::SeqCst);
        let n = req.into_inner().ends.len();
        c.ends.fetch_add(n as u32, Ordering::SeqCst);
        Ok(Response::new(pb::EndTransactionsResponse {
            status: ok(),
            results: vec![ok().unwrap_or_default(); n],
        }))
    }

    async fn transaction_batch(
        &self,
        _: Request<pb::TransactionBatchRequest>,
    ) -> Result<Response<pb::TransactionBatchResponse>, Status> {
        self.0.batch.fetch_add(1, Ordering::SeqCst);
        Err(Status::unimplemented("unknown method TransactionBatch"))
    }

    async fn session(
        &self,
        _: Request<tonic::Streaming<pb::SessionUp>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let welcome = pb::SessionDown {
            kind: Some(pb::session_down::Kind::Welcome(pb::Welcome {
                session_id: 1,
            })),
        };
        let s = tokio_stream::StreamExt::chain(
            tokio_stream::once(Ok(welcome)),
            tokio_stream::pending(),
        );
        Ok(Response::new(Box::pin(s)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_fall_back_to_separate_requests_on_an_older_broker() {
    let calls = Arc::new(Calls::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::producer_server::ProducerServer::new(OldBroker(
                Arc::clone(&calls),
            )))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let c = Client::connect(&addr.to_string()).await.unwrap();
    let p = TransactionProducer::new(c, "pg", |_: MessageView| {
        std::future::ready(TransactionResolution::Unknown)
    });
    // Transactions from 32 tasks with local transactions of 0-2 ms, so that
    // half sends and ends meet in coalesced batches.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = (0..32u64)
        .map(|i| {
            let (p, stop) = (p.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut done = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    let out = p
                        .send_in_transaction(Message::new("t", format!("{i}")), |_| async move {
                            tokio::time::sleep(Duration::from_micros(i % 3 * 1000)).await;
                            Ok::<_, std::convert::Infallible>(TransactionResolution::Commit)
                        })
                        .await
                        .unwrap();
                    assert_eq!(out.resolution, TransactionResolution::Commit);
                    done += 1;
                }
                done
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while calls.batch.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no batch ever held both a half and an end"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // more mixed batches
    stop.store(true, Ordering::SeqCst);
    let mut transactions = 0;
    for t in tasks {
        transactions += t.await.unwrap();
    }
    // Every half and every end got through, by the separate requests.
    assert!(transactions > 0);
    assert_eq!(calls.halves.load(Ordering::SeqCst), transactions);
    assert_eq!(calls.ends.load(Ordering::SeqCst), transactions);
    // TransactionBatch was tried only by the batches already in flight when
    // the first UNIMPLEMENTED came back, and never again.
    let tries = calls.batch.load(Ordering::SeqCst);
    assert!(
        (1..=halfmq_client::DEFAULT_MAX_INFLIGHT_BATCHES as u32).contains(&tries),
        "{tries} tries: the fallback must be remembered"
    );
    assert!(calls.end_transactions.load(Ordering::SeqCst) > 0);
    assert!(calls.send_halves.load(Ordering::SeqCst) > 0);
    server.abort();
}
