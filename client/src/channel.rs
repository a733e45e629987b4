//! Connection settings ([`ClientOptions`], [`Credentials`],
//! [`TlsOptions`]) and the channels they open: every request is signed
//! when credentials are given (`halfmq_proto::auth`).

use std::time::Duration;

use halfmq_proto::auth::Signer;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::ClientError;

/// A channel to a broker, signing each request.
pub(crate) type Ch = InterceptedService<Channel, Signer>;

/// A user and its secret. The secret never leaves the process: requests
/// carry a proof derived from it (README "Security").
#[derive(Clone)]
pub struct Credentials {
    user: String,
    signer: Signer,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// `user` with `secret` (derives the signing key: about a millisecond
    /// in a release build).
    pub fn new(user: &str, secret: &str) -> Credentials {
        Credentials {
            user: user.to_owned(),
            signer: Signer::new(user, secret),
        }
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }
}

/// TLS to the broker: the CA its certificate is checked against, and for a
/// broker that requires client certificates (mTLS) this client's own.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM CA certificate(s).
    pub ca_pem: Vec<u8>,
    /// PEM certificate chain and key of this client (mTLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the broker's certificate must carry; default: the host of
    /// the address.
    pub domain: Option<String>,
}

impl TlsOptions {
    /// Reads the CA (and, with `cert` and `key`, the client identity) from
    /// PEM files.
    ///
    /// # Errors
    /// [`ClientError::Connect`] naming a file that cannot be read.
    pub fn from_files(
        ca: &std::path::Path,
        identity: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<TlsOptions, ClientError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| ClientError::Connect(format!("{}: {e}", p.display())))
        };
        Ok(TlsOptions {
            ca_pem: read(ca)?,
            identity: match identity {
                Some((c, k)) => Some((read(c)?, read(k)?)),
                None => None,
            },
            domain: None,
        })
    }
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Timeout to establish the connection. Default 3 s.
    pub connect_timeout: Duration,
    /// Timeout of one request, long polls excluded (they add their wait).
    /// Default 10 s.
    pub request_timeout: Duration,
    /// Attempts for calls safe to repeat (receive, ack, admin, sends whose
    /// messages all carry idempotency keys). Default 5.
    pub max_attempts: u32,
    /// First retry backoff; doubles each attempt up to 2 s. Default 50 ms.
    pub initial_backoff: Duration,
    /// With several brokers (a broker group): how long a request keeps
    /// looking for the leader (following `NOT_LEADER` hints, trying the
    /// other addresses) before it fails. Default 10 s.
    pub failover_timeout: Duration,
    /// The user every request is signed as (a broker with auth on).
    /// Default none: requests are not signed.
    pub credentials: Option<Credentials>,
    /// TLS to the broker (a broker started with `--tls-cert`). Default
    /// none: plaintext.
    pub tls: Option<TlsOptions>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            max_attempts: 5,
            initial_backoff: Duration::from_millis(50),
            failover_timeout: Duration::from_secs(10),
            credentials: None,
            tls: None,
        }
    }
}

/// A lazily connected channel to `addr`, signing with `opts`' credentials.
pub(crate) fn open_channel(addr: &str, opts: &ClientOptions) -> Result<Ch, ClientError> {
    let url = endpoint_url(addr, opts.tls.is_some())?;
    let mut ep =
        Endpoint::from_shared(url).map_err(|e| ClientError::Connect(format!("{addr}: {e}")))?;
    if let Some(t) = &opts.tls {
        let mut c = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&t.ca_pem));
        if let Some((cert, key)) = &t.identity {
            c = c.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        if let Some(d) = &t.domain {
            c = c.domain_name(d.clone());
        }
        ep = ep
            .tls_config(c)
            .map_err(|e| ClientError::Connect(format!("{addr}: TLS: {e}")))?;
    }
    let ep = ep
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let signer = opts
        .credentials
        .as_ref()
        .map_or_else(Signer::none, |c| c.signer.clone());
    Ok(InterceptedService::new(ep.connect_lazy(), signer))
}

/// The URL of a broker address: `HOST:PORT` (or a full `http://` or `https://` URL
/// with a port; `https` with TLS); a missing port is an error rather than port 80.
pub(crate) fn endpoint_url(addr: &str, tls: bool) -> Result<String, ClientError> {
    let no_port = || {
        ClientError::Connect(format!(
            "broker address {addr:?} has no port: use HOST:PORT, e.g. 127.0.0.1:8081"
        ))
    };
    let scheme = if tls { "https" } else { "http" };
    if addr.contains("://") {
        let uri: tonic::codegen::http::Uri = addr
            .parse()
            .map_err(|e| ClientError::Connect(format!("{addr}: {e}")))?;
        return if uri.port().is_some() {
            Ok(addr.to_owned())
        } else {
            Err(no_port())
        };
    }
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(format!("{scheme}://{addr}"));
    }
    match addr.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty() && !host.contains(':') && port.parse::<u16>().is_ok() =>
        {
            Ok(format!("{scheme}://{addr}"))
        }
        _ => Err(no_port()),
    }
}
