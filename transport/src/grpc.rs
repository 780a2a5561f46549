//! What the Control and Weights services share: addresses, optional TLS
//! (rustls), and the bearer token every request must carry when one is set.
//!
//! The token is read from the file `grpc.token_file` or the environment
//! variable named by `grpc.token_env` (a Kubernetes Secret mounts either); the
//! config only names where it is, so it never appears in `--print-config`, and
//! [`Token`]'s `Debug` does not show it.

use super::{Error, Result};
use prism_core::config::{Invalid, check};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// `[grpc]`: the learner's gRPC endpoint (Control and Weights services).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the learner listens. Default `0.0.0.0:50051`.
    pub listen: String,
    /// Where workers reach the learner, `http://host:port` (`https://` with TLS).
    /// Default `http://127.0.0.1:50051`.
    pub learner: String,
    /// Environment variable holding the bearer token; unset or empty = no token.
    /// Default `PRISM_TOKEN`.
    pub token_env: String,
    /// File holding the bearer token (wins over `token_env`); empty = none.
    /// Default empty.
    pub token_file: String,
    /// Learner: PEM certificate chain to serve TLS with; empty = plaintext.
    /// Default empty.
    pub tls_cert: String,
    /// Learner: PEM private key of `tls_cert`. Default empty.
    pub tls_key: String,
    /// Workers: PEM CA certificate to verify the learner with; empty = the
    /// system's roots when `learner` is `https://`. Default empty.
    pub tls_ca: String,
    /// Workers: the name the learner's certificate is checked against; empty =
    /// the host of `learner`. Default empty.
    pub tls_domain: String,
    /// How long a worker waits for the learner to accept a connection, in ms.
    /// Default 5000.
    pub connect_timeout_ms: u64,
    /// Deadline of one unary request, in ms. Default 30000.
    pub request_timeout_ms: u64,
    /// Size of one weight chunk on the Weights stream, in bytes. Default 4194304.
    pub chunk_bytes: usize,
    /// Connections a rollout process fetches each version over, in parallel
    /// (the version is split between them), 1 to 64. Default 2.
    pub weight_streams: u32,
    /// Learner: serve a `listen` address other hosts can reach without a
    /// token (anyone who reaches it can stop the run, fetch every weight and
    /// read the training data). Without it, such a learner refuses to start.
    /// Default false.
    pub insecure: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50051".into(),
            learner: "http://127.0.0.1:50051".into(),
            token_env: "PRISM_TOKEN".into(),
            token_file: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_ca: String::new(),
            tls_domain: String::new(),
            connect_timeout_ms: 5000,
            request_timeout_ms: 30_000,
            chunk_bytes: 4 << 20,
            weight_streams: 2,
            insecure: false,
        }
    }
}

/// Largest chunk accepted, leaving room under gRPC message limits.
const MAX_CHUNK_BYTES: usize = 64 << 20;

impl Config {
    /// Checks values that parse but are not acceptable.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(Invalid::new("grpc.listen", &self.listen, "must be ip:port, e.g. 0.0.0.0:50051"));
        }
        if !(self.learner.starts_with("http://") || self.learner.starts_with("https://")) {
            return Err(Invalid::new("grpc.learner", &self.learner, "must start with http:// or https://"));
        }
        if self.tls_cert.is_empty() != self.tls_key.is_empty() {
            return Err(Invalid::new("grpc.tls_key", &self.tls_key, "grpc.tls_cert and grpc.tls_key go together"));
        }
        check::positive("grpc.connect_timeout_ms", self.connect_timeout_ms)?;
        check::positive("grpc.request_timeout_ms", self.request_timeout_ms)?;
        check::in_range("grpc.chunk_bytes", self.chunk_bytes, 1024, MAX_CHUNK_BYTES)?;
        check::in_range("grpc.weight_streams", self.weight_streams, 1, super::weights::MAX_STREAMS)?;
        Ok(())
    }

    /// Whether a learner may serve `listen` holding `token`: on a loopback
    /// address always; on one other hosts can reach only with a token, or
    /// with `insecure` said explicitly.
    pub fn check_exposure(&self, token: Option<&Token>) -> Result<(), Invalid> {
        let Ok(addr) = self.listen.parse::<std::net::SocketAddr>() else { return self.validate() };
        if token.is_some() || addr.ip().is_loopback() || self.insecure {
            return Ok(());
        }
        let source = if self.token_file.is_empty() { format!("the environment variable {}", self.token_env) } else { self.token_file.clone() };
        Err(Invalid::new(
            "grpc.listen",
            &self.listen,
            format!(
                "other hosts can reach it and no token is set ({source} is empty): anyone who reaches the port \
                 could stop the run, fetch every weight and read the training data. Give every process of the run \
                 a token (export {}=$(openssl rand -hex 32), or grpc.token_file), listen on 127.0.0.1, or opt out \
                 explicitly with grpc.insecure = true",
                self.token_env
            ),
        ))
    }

    /// The largest gRPC message either side accepts: a chunk plus its header.
    pub fn max_message_bytes(&self) -> usize {
        self.chunk_bytes + (1 << 20)
    }
}

/// The bearer token. Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

impl Token {
    /// A token from its text (surrounding whitespace removed).
    pub fn new(secret: &str) -> Result<Self> {
        let secret = secret.trim();
        if secret.is_empty() || !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Secret {
                source_name: "token".into(),
                reason: "must be non-empty printable ASCII without spaces".into(),
            });
        }
        Ok(Self(secret.into()))
    }

    /// The token named by `config`: the file `grpc.token_file` if set, else the
    /// variable `grpc.token_env` if set and non-empty, else none.
    pub fn from_config(config: &Config) -> Result<Option<Self>> {
        if !config.token_file.is_empty() {
            let text = std::fs::read_to_string(&config.token_file).map_err(|e| Error::Secret {
                source_name: format!("grpc.token_file {}", config.token_file),
                reason: e.to_string(),
            })?;
            return Self::new(&text)
                .map(Some)
                .map_err(|_| Error::Secret {
                    source_name: format!("grpc.token_file {}", config.token_file),
                    reason: "is empty or not printable ASCII".into(),
                });
        }
        match std::env::var(&config.token_env) {
            Ok(v) if !v.trim().is_empty() => Self::new(&v).map(Some).map_err(|_| Error::Secret {
                source_name: format!("environment variable {}", config.token_env),
                reason: "is not printable ASCII without spaces".into(),
            }),
            _ => Ok(None),
        }
    }

    /// The secret, for keys derived from it (the seal of stream entries).
    pub(crate) fn secret(&self) -> &str {
        &self.0
    }

    fn header(&self) -> MetadataValue<Ascii> {
        // Token::new only admits printable ASCII, which is a valid header value.
        format!("Bearer {}", self.0).parse().expect("printable ASCII is a valid header value")
    }
}

/// Server side: refuses requests without the run's token.
#[derive(Clone, Debug)]
pub struct Auth {
    token: Option<Token>,
}

impl Auth {
    /// Checks requests against `token`; `None` admits every request.
    pub fn new(token: Option<Token>) -> Self {
        Self { token }
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, request: Request<()>) -> std::result::Result<Request<()>, Status> {
        let Some(token) = &self.token else { return Ok(request) };
        let Some(got) = request.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "no bearer token: this learner requires one (give workers the token via grpc.token_env or grpc.token_file)",
            ));
        };
        let want = token.header();
        if !constant_time_eq(got.as_bytes(), want.as_bytes()) {
            return Err(Status::unauthenticated("wrong bearer token: it does not match the learner's"));
        }
        Ok(request)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Client side: adds the token to every request.
#[derive(Clone, Debug)]
pub struct ClientAuth {
    header: Option<MetadataValue<Ascii>>,
}

impl ClientAuth {
    /// Sends `token` (or nothing).
    pub fn new(token: Option<&Token>) -> Self {
        Self { header: token.map(Token::header) }
    }
}

impl tonic::service::Interceptor for ClientAuth {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    }
}

/// Makes ring rustls's process-wide crypto provider (once). With more than one
/// provider compiled in (other crates bring aws-lc), rustls cannot pick one by
/// itself and TLS setup would panic.
pub(crate) fn crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err = a provider is already installed, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The server's TLS settings, when `grpc.tls_cert` is set.
pub fn server_tls(config: &Config) -> Result<Option<ServerTlsConfig>> {
    if config.tls_cert.is_empty() {
        return Ok(None);
    }
    crypto_provider();
    let read = |key: &str, path: &str| {
        std::fs::read(path).map_err(|e| Error::Tls(format!("{key} {path}: cannot read it: {e}")))
    };
    let identity = Identity::from_pem(read("grpc.tls_cert", &config.tls_cert)?, read("grpc.tls_key", &config.tls_key)?);
    Ok(Some(ServerTlsConfig::new().identity(identity)))
}

/// A channel to the learner at `addr` (`http://` or `https://`), connected
/// within `grpc.connect_timeout_ms` or a clear error naming the address.
pub async fn connect(config: &Config, addr: &str) -> Result<Channel> {
    let fail = |reason: String| Error::Connect { addr: addr.to_string(), timeout_ms: config.connect_timeout_ms, reason };
    let timeout = Duration::from_millis(config.connect_timeout_ms);
    let mut endpoint = Endpoint::from_shared(addr.to_string())
        .map_err(|e| fail(format!("not a valid address ({e})")))?
        .connect_timeout(timeout)
        .timeout(Duration::from_millis(config.request_timeout_ms))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .max_frame_size(Some(1 << 20));
    if addr.starts_with("https://") {
        crypto_provider();
        let mut tls = ClientTlsConfig::new();
        if config.tls_ca.is_empty() {
            tls = tls.with_native_roots();
        } else {
            let ca = std::fs::read(&config.tls_ca).map_err(|e| Error::Tls(format!("grpc.tls_ca {}: cannot read it: {e}", config.tls_ca)))?;
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if !config.tls_domain.is_empty() {
            tls = tls.domain_name(config.tls_domain.clone());
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| Error::Tls(e.to_string()))?;
    }
    // A learner that is still starting refuses connections: keep trying until
    // the timeout, so workers may start before (or with) it.
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, endpoint.connect()).await {
            Ok(Ok(channel)) => return Ok(channel),
            Ok(Err(e)) if tokio::time::Instant::now() + Duration::from_millis(100) < deadline => {
                tracing::debug!(addr, error = %error_chain(&e), "learner not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(e)) => return Err(fail(error_chain(&e))),
            Err(_) => return Err(fail("no connection".into())),
        }
    }
}

/// An error and its causes on one line (tonic's transport errors hide the
/// useful part in their sources).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Serves the learner's Control and Weights services on `listener` (TLS when
/// `grpc.tls_cert` is set; every request checked against `token`) until
/// `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: &Config,
    token: Option<Token>,
    control: &super::control::Control,
    weights: &super::weights::Weights,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let fail = |reason: String| Error::Serve { what: "gRPC services", addr: addr.clone(), reason };
    let mut server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .max_frame_size(Some(1 << 20));
    if let Some(tls) = server_tls(config)? {
        server = server.tls_config(tls).map_err(|e| fail(error_chain(&e)))?;
    }
    server
        .add_service(control.service(token.clone()))
        .add_service(weights.service(token, config.max_message_bytes()))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| fail(error_chain(&e)))
}

/// Response metadata naming why a Control or Weights request was refused,
/// when the gRPC code alone does not say it: a client tells "not ready yet"
/// and "gone" apart from other refusals without reading the message.
const REFUSAL_KEY: &str = "prism-refusal";

fn marked(code: tonic::Code, message: String, refusal: &'static str) -> Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(REFUSAL_KEY, MetadataValue::from_static(refusal));
    Status::with_metadata(code, message, metadata)
}

/// The server cannot answer this yet; the client gets [`Error::NotReady`].
pub(crate) fn not_ready(message: impl Into<String>) -> Status {
    marked(tonic::Code::Unavailable, message.into(), "not-ready")
}

/// What the request is about is gone; the client gets [`Error::Gone`].
pub(crate) fn gone(code: tonic::Code, message: impl Into<String>) -> Status {
    marked(code, message.into(), "gone")
}

/// The error a client reports for `status` from `rpc` at `addr`: the
/// server's mark when it set one, else what the gRPC code means.
pub(crate) fn rpc_error(addr: &str, rpc: &'static str, status: Status) -> Error {
    use tonic::Code;
    let addr = addr.to_string();
    let refusal = status.metadata().get(REFUSAL_KEY).and_then(|v| v.to_str().ok());
    match (refusal, status.code()) {
        (Some("not-ready"), _) => Error::NotReady { addr, rpc, reason: status.message().to_string() },
        (Some("gone"), _) | (_, Code::NotFound | Code::FailedPrecondition) => {
            Error::Gone { addr, rpc, reason: status.message().to_string() }
        }
        (_, Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown | Code::Aborted) => {
            Error::Unreachable { addr, rpc, reason: describe(&status) }
        }
        _ => Error::Refused { addr, rpc, reason: describe(&status) },
    }
}

/// A status's message with its code, e.g. `no bearer token (unauthenticated)`.
fn describe(status: &Status) -> String {
    let code = format!("{:?}", status.code()).chars().fold(String::new(), |mut s, c| {
        if c.is_uppercase() && !s.is_empty() {
            s.push(' ');
        }
        s.push(c.to_ascii_lowercase());
        s
    });
    if status.message().is_empty() { code } else { format!("{} ({code})", status.message()) }
}
