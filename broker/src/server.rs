//! The network edge: binds the listener, bounds connections, serves the gRPC
//! services, and shuts down gracefully (stop accepting, wake long polls, drain
//! in-flight requests, save consumer progress, checkpoint, fdatasync).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use halfmq_proto::v1 as pb;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tonic::transport::server::Connected;

use crate::auth::layer::{AuthLayer, ConnInfo, Gate};

use crate::api::halfmq::Services;
use crate::config::BrokerConfig;
use crate::core::{Broker, Clock, SystemClock};
use crate::error::BrokerError;

/// The tokio runtime builder for `worker_threads` (the `worker_threads`
/// config key): 1 is tokio's current-thread scheduler, which costs less per
/// task switch than a one-worker work-stealing pool (benches/README.md);
/// 0 is a multi-thread pool with one worker per CPU core; any other n a
/// multi-thread pool of n workers. The caller enables drivers and builds.
pub fn runtime_builder(worker_threads: usize) -> tokio::runtime::Builder {
    match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 0 {
                b.worker_threads(n);
            }
            b
        }
    }
}

/// Binds the listening socket of `cfg.listen`, with an accept backlog of
/// `max_connections` (at least 1,024): a burst of clients connecting at once
/// then waits in the kernel instead of having its SYNs dropped.
///
/// # Errors
/// The operating system's, from socket, bind or listen; `InvalidInput` when
/// `listen` does not resolve.
pub fn bind(cfg: &BrokerConfig) -> std::io::Result<TcpListener> {
    let addr = cfg
        .listen_addr()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(cfg.max_connections.max(1024))
}

/// The first bytes every HTTP/2 client sends (RFC 9113 section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client's socket: plain TCP, or TLS over it.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

macro_rules! on_io {
    ($io:expr, $s:ident => $e:expr) => {
        match $io {
            Io::Plain($s) => $e,
            Io::Tls($s) => $e,
        }
    };
}

/// A connection holding one of the `max_connections` permits, closed by its
/// reader when the peer sends nothing for `idle_timeout_ms`.
struct LimitedConn {
    io: Io,
    info: ConnInfo,
    /// The preface already read by the handshake, handed to hyper first.
    preface: &'static [u8],
    idle: Duration,
    idle_timer: Pin<Box<tokio::time::Sleep>>,
    _permit: OwnedSemaphorePermit,
    _counted: Counted,
}

/// Counts a connection in the broker's stats while it lives.
struct Counted(Arc<Broker>);

impl Counted {
    fn new(b: &Arc<Broker>) -> Counted {
        b.count_connection(true);
        Counted(Arc::clone(b))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.count_connection(false);
    }
}

impl Connected for LimitedConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for LimitedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.preface.is_empty() {
            let n = this.preface.len().min(buf.remaining());
            buf.put_slice(&this.preface[..n]);
            this.preface = &this.preface[n..];
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let read = on_io!(&mut this.io, io => Pin::new(io).poll_read(cx, buf));
        match read {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let at = tokio::time::Instant::now() + this.idle;
                    this.idle_timer.as_mut().reset(at);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match this.idle_timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connection idle past idle_timeout_ms",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for LimitedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        on_io!(&mut self.io, io => Pin::new(io).poll_write(cx, buf))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        on_io!(&mut self.io, io => Pin::new(io).poll_flush(cx))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        on_io!(&mut self.io, io => Pin::new(io).poll_shutdown(cx))
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        on_io!(&mut self.io, io => Pin::new(io).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        on_io!(&self.io, io => io.is_write_vectored())
    }
}

/// Serves `broker` on `listener` until `shutdown` completes, then drains and
/// shuts the broker down.
///
/// # Errors
/// Transport errors, and the broker's last save.
pub async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BrokerError> {
    serve_member(broker, listener, shutdown, None).await
}

/// [`serve`] for a broker group member: also serves the replicas' RPCs
/// (`halfmq.raft.v1`) of `node` on the same listener, and stops its
/// consensus before the broker closes its store.
///
/// # Errors
/// As [`serve`].
pub async fn serve_member(
    broker: Arc<Broker>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    node: Option<crate::cluster::NodeHandle>,
) -> Result<(), BrokerError> {
    let http = crate::http::bind(&broker.config().http_listen).await?;
    serve_bound(broker, listener, http, shutdown, node).await
}

/// [`serve_member`] with the HTTP endpoint's listener already bound (or
/// none: off), so that a caller can bind every port before it says it
/// listens.
///
/// # Errors
/// As [`serve`].
pub async fn serve_bound(
    broker: Arc<Broker>,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    node: Option<crate::cluster::NodeHandle>,
) -> Result<(), BrokerError> {
    // The hot path's histograms are recorded only when they can be read.
    let recorders = http
        .as_ref()
        .map(|_| Arc::new(crate::http::Recorders::new()));
    if let Some(r) = &recorders {
        broker.store().log().set_flush_observer(Arc::clone(r) as _);
    }
    if let Some(h) = http {
        crate::http::spawn(Arc::clone(&broker), h, recorders.clone(), node.clone());
    }
    let cfg = broker.config().clone();
    let tls = if cfg.tls.enabled() {
        Some(crate::auth::tls::acceptor(&cfg.tls)?)
    } else {
        None
    };
    // Routes given to RocketMQ clients that name no endpoint point here.
    let advertised = listener
        .local_addr()
        .map_or_else(|_| cfg.listen.clone(), |a| a.to_string());
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel::<std::io::Result<LimitedConn>>(64);
    let (stop_accept_tx, stop_accept_rx) = oneshot::channel::<()>();
    let accept = tokio::spawn(accept_loop(
        Arc::clone(&broker),
        listener,
        tls,
        conn_tx,
        stop_accept_rx,
    ));
    let b = Arc::clone(&broker);
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: refusing new work, draining requests");
        let _ = stop_accept_tx.send(());
        b.begin_shutdown();
    };
    let svc = Services::new(Arc::clone(&broker));
    // Requests up to max_batch_bytes plus headroom are read, so the broker
    // itself answers MESSAGE_TOO_LARGE / BATCH_TOO_LARGE for what its
    // limits refuse (tonic's default would cut every request at 4 MiB).
    let max_request = cfg.max_request_bytes();
    let result = tonic::transport::Server::builder()
        .layer(
            tower::ServiceBuilder::new()
                .layer(crate::http::RequestTimerLayer::new(recorders))
                .layer(AuthLayer::new(gate(&broker)))
                .into_inner(),
        )
        .concurrency_limit_per_connection(cfg.max_requests_per_connection as usize)
        // Clients learn the limit instead of having streams queue up.
        .max_concurrent_streams(Some(cfg.max_requests_per_connection))
        // Live peers answer pings, so a connection busy only with a long
        // session or long poll is never idle; dead ones are closed.
        .http2_keepalive_interval(Some(keepalive_interval(&cfg)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(
            pb::producer_server::ProducerServer::new(svc.clone())
                .max_decoding_message_size(max_request)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            pb::consumer_server::ConsumerServer::new(svc.clone())
                .max_decoding_message_size(max_request)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(pb::security_server::SecurityServer::new(svc.clone()))
        .add_service(
            pb::admin_server::AdminServer::new(svc)
                .max_decoding_message_size(max_request)
                .max_encoding_message_size(usize::MAX),
        )
        .add_optional_service(cfg.rocketmq_enabled.then(|| {
            crate::api::rocketmq::RocketMq::new(Arc::clone(&broker), advertised).into_server()
        }))
        .add_optional_service(
            node.clone()
                .map(|n| crate::cluster::network::RaftService::new(n).into_server()),
        )
        .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(conn_rx), signal)
        .await;
    accept.abort();
    if let Some(n) = node {
        n.shutdown().await;
    }
    let closed = broker.shutdown().await;
    tracing::info!("broker stopped");
    result.map_err(|e| BrokerError::Internal(format!("transport: {e}")))?;
    closed
}

/// The auth gate of `broker`'s requests; `None` with auth off.
fn gate(broker: &Arc<Broker>) -> Option<Arc<Gate>> {
    let a = &broker.config().auth;
    if !a.enabled {
        return None;
    }
    let verifier = crate::auth::verify::Verifier::new(
        Arc::clone(broker.users()),
        a.cluster_secret.as_ref().map(|s| s.expose()),
        a.max_request_age_ms,
        usize::try_from(a.max_replay_nonces).unwrap_or(usize::MAX),
    );
    let b = Arc::downgrade(broker);
    Some(Arc::new(Gate::new(
        verifier,
        Arc::new(move || b.upgrade().map_or(0, |b| b.now_ms())),
        a.failure_delay_max_ms,
    )))
}

/// How often the broker pings each connection: 60 s, or a third of
/// `idle_timeout_ms` when that is shorter (a pinged peer answers, which
/// counts as traffic).
fn keepalive_interval(cfg: &BrokerConfig) -> Duration {
    Duration::from_millis((cfg.idle_timeout_ms / 3).clamp(100, 60_000))
}

/// Accepts connections until `stop` fires. Each new socket first has
/// `handshake_timeout_ms` to send the HTTP/2 preface while it holds one of
/// `max_handshaking_connections` places (when they are all taken, the oldest
/// handshake is dropped for the new one, so sockets that never speak cannot
/// keep clients out); only then does it take a `max_connections` slot.
async fn accept_loop(
    broker: Arc<Broker>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    conn_tx: tokio::sync::mpsc::Sender<std::io::Result<LimitedConn>>,
    mut stop: oneshot::Receiver<()>,
) {
    let cfg = broker.config().clone();
    let permits = Arc::new(Semaphore::new(cfg.max_connections as usize));
    let refusals = Arc::new(RefusalLog::default());
    let max_pending = cfg.max_handshaking_connections as usize;
    let mut pending: std::collections::VecDeque<tokio::task::AbortHandle> =
        std::collections::VecDeque::new();
    loop {
        let (io, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        if pending.len() >= max_pending {
            pending.retain(|h| !h.is_finished());
        }
        if pending.len() >= max_pending {
            if let Some(oldest) = pending.pop_front() {
                oldest.abort();
                refusals.refused("the oldest unfinished handshake was dropped for a new connection (max_handshaking_connections)");
            }
        }
        let _ = io.set_nodelay(true);
        let handshake = tokio::spawn(handshake(
            io,
            tls.clone(),
            peer,
            Arc::clone(&broker),
            Arc::clone(&permits),
            Arc::clone(&refusals),
            conn_tx.clone(),
        ));
        pending.push_back(handshake.abort_handle());
    }
    for h in pending {
        h.abort();
    }
}

/// Runs the TLS handshake (with TLS on) and reads the HTTP/2 preface of a
/// new socket, both within `handshake_timeout_ms`, then hands it to the
/// server with a `max_connections` slot.
async fn handshake(
    tcp: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    peer: SocketAddr,
    broker: Arc<Broker>,
    permits: Arc<Semaphore>,
    refusals: Arc<RefusalLog>,
    conn_tx: tokio::sync::mpsc::Sender<std::io::Result<LimitedConn>>,
) {
    use tokio::io::AsyncReadExt;
    let cfg = broker.config();
    let mut first = [0u8; PREFACE.len()];
    let timeout = Duration::from_millis(cfg.handshake_timeout_ms);
    let opened = tokio::time::timeout(timeout, async {
        let mut io = match tls {
            None => Io::Plain(tcp),
            Some(acceptor) => match acceptor.accept(tcp).await {
                Ok(s) => Io::Tls(Box::new(s)),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return Err("TLS handshake failed (a plaintext client, or an untrusted certificate)");
                }
            },
        };
        match on_io!(&mut io, s => s.read_exact(&mut first).await) {
            Ok(_) if &first == PREFACE => Ok(io),
            Ok(_) => Err("the client did not speak HTTP/2 (gRPC)"),
            Err(_) => Err(""),
        }
    })
    .await;
    let io = match opened {
        Ok(Ok(io)) => io,
        Ok(Err("")) => return,
        Ok(Err(why)) => {
            refusals.refused(why);
            return;
        }
        Err(_) => {
            refusals.refused("no TLS handshake and HTTP/2 preface within handshake_timeout_ms");
            return;
        }
    };
    let Ok(permit) = permits.try_acquire_owned() else {
        refusals.refused("max_connections reached");
        tracing::debug!(%peer, "connection refused: max_connections reached");
        return;
    };
    let idle = Duration::from_millis(cfg.idle_timeout_ms);
    let info = ConnInfo {
        remote: Some(peer),
        tls: matches!(io, Io::Tls(_)),
        failures: Arc::default(),
    };
    let conn = LimitedConn {
        io,
        info,
        preface: PREFACE,
        idle,
        idle_timer: Box::pin(tokio::time::sleep(idle)),
        _permit: permit,
        _counted: Counted::new(&broker),
    };
    let _ = conn_tx.send(Ok(conn)).await;
}

/// Logs refused connections at most once a second, with how many were
/// refused since the last line (a flood of connects must not flood the log).
#[derive(Default)]
struct RefusalLog {
    state: std::sync::Mutex<(Option<tokio::time::Instant>, u64)>,
}

impl RefusalLog {
    fn refused(&self, why: &'static str) {
        let now = tokio::time::Instant::now();
        let mut st = crate::core::lock(&self.state);
        st.1 += 1;
        if st
            .0
            .is_none_or(|last| now.duration_since(last) >= Duration::from_secs(1))
        {
            tracing::warn!(
                refused = st.1,
                last_reason = why,
                "connections refused in the last second"
            );
            *st = (Some(now), 0);
        }
    }
}

/// A broker running in this process (tests, the bench's embedded mode).
#[derive(Debug)]
pub struct RunningBroker {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The HTTP endpoint's address (`http_listen`), if on.
    pub http_addr: Option<SocketAddr>,
    /// The broker.
    pub broker: Arc<Broker>,
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<Result<(), BrokerError>>>,
}

impl RunningBroker {
    /// Shuts down gracefully and waits until the store is closed.
    ///
    /// # Errors
    /// As [`serve`].
    pub async fn shutdown(mut self) -> Result<(), BrokerError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.join.take() {
            Some(j) => j.await.map_err(|e| BrokerError::Internal(e.to_string()))?,
            None => Ok(()),
        }
    }
}

/// Opens the broker and serves it on `cfg.listen` (port 0 picks a free port)
/// with the system clock, in the background of the current runtime.
///
/// # Errors
/// Configuration, storage and bind errors.
pub async fn start(cfg: BrokerConfig) -> Result<RunningBroker, BrokerError> {
    start_with_clock(cfg, Arc::new(SystemClock)).await
}

/// [`start`] with an injected clock.
///
/// # Errors
/// As [`start`].
pub async fn start_with_clock(
    cfg: BrokerConfig,
    clock: Arc<dyn Clock>,
) -> Result<RunningBroker, BrokerError> {
    let listener =
        bind(&cfg).map_err(|e| BrokerError::Internal(format!("bind {}: {e}", cfg.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| BrokerError::Internal(format!("local_addr: {e}")))?;
    let http = crate::http::bind(&cfg.http_listen).await?;
    let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
    let broker = tokio::task::spawn_blocking(move || Broker::open(cfg, clock))
        .await
        .map_err(|e| BrokerError::Internal(e.to_string()))??;
    broker.start_background();
    tracing::info!(%addr, "halfmq broker listening");
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let join = tokio::spawn(serve_bound(
        Arc::clone(&broker),
        listener,
        http,
        async move {
            let _ = stop_rx.await;
        },
        None,
    ));
    Ok(RunningBroker {
        addr,
        http_addr,
        broker,
        stop: Some(stop_tx),
        join: Some(join),
    })
}
