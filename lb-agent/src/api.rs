//! The agent's HTTP endpoint (`--api-addr`): `/healthz` (the process serves), `/readyz`
//! (the datapath is attached and current, see [`crate::readiness`]), and `/v1/frontends`, the desired
//! state with what the maps cannot hold: Service and port names, where each endpoint came
//! from, its node and zone. `lb-agent services --api-addr` merges it into its listing.
//! `/v1/env/<namespace>` gives the kubelet's Service variables for `lb-agent env`.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{Arc, RwLock},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::StatusCode,
    routing::get,
};
use serde::{Deserialize, Serialize};

use crate::{
    dns::index::SharedDnsIndex,
    explain,
    model::{DesiredState, EndpointInfo},
    readiness::Readiness,
};

/// A frontend as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FrontendView {
    /// `address:port/PROTO` (`[v6]:port/PROTO`), as `lb-agent services` prints it.
    pub frontend: String,
    pub kind: String,
    /// `namespace/name` of the Service.
    pub service: String,
    pub port_name: String,
    pub backends: Vec<BackendView>,
}

/// A backend as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendView {
    /// `address:port/PROTO`.
    pub backend: String,
    /// `Ready` or `Terminating`.
    pub state: String,
    /// EndpointSlice name, or `pod/<name>` when derived from a Pod.
    pub source: String,
    pub node_name: Option<String>,
    pub zone: Option<String>,
}

/// What the agent publishes.
#[derive(Debug, Default)]
pub struct Status {
    /// Whether the datapath is attached and current.
    pub readiness: Arc<Readiness>,
    /// The desired state, kept up to date frontend by frontend.
    pub desired: DesiredState,
    /// Where `/v1/explain` asks the reconcile loop.
    pub explain: Option<tokio::sync::mpsc::Sender<explain::Query>>,
}

pub type SharedStatus = Arc<RwLock<Status>>;

/// The views of a desired state.
#[must_use]
pub fn views(desired: &DesiredState) -> Vec<FrontendView> {
    desired
        .values()
        .map(|f| FrontendView {
            frontend: f.address.to_string(),
            kind: format!("{:?}", f.kind),
            service: f.service.to_string(),
            port_name: f.port_name.to_string(),
            backends: f
                .backends
                .iter()
                .zip(&f.backend_info)
                .map(|(b, info)| {
                    let EndpointInfo {
                        source,
                        node_name,
                        zone,
                    } = &**info;
                    BackendView {
                        backend: b.addr.to_string(),
                        state: format!("{:?}", b.state),
                        source: source.to_string(),
                        node_name: node_name.as_deref().map(str::to_string),
                        zone: zone.as_deref().map(str::to_string),
                    }
                })
                .collect(),
        })
        .collect()
}

/// Serves the endpoint on `listener` until the task is dropped.
///
/// # Errors
/// When accepting connections fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    status: SharedStatus,
    dns: SharedDnsIndex,
) -> std::io::Result<()> {
    let env = Router::new()
        .route("/v1/env/{namespace}", get(env))
        .with_state(dns);
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/frontends", get(frontends))
        .route("/v1/explain", get(explain_handler))
        .with_state(status)
        .merge(env);
    tracing::info!(addr = %listener.local_addr()?, "API listening");
    crate::listen::serve_http(listener, app).await
}

async fn readyz(State(status): State<SharedStatus>) -> (StatusCode, String) {
    let readiness = status.read().map(|s| Arc::clone(&s.readiness));
    match readiness.map(|r| r.check(std::time::Instant::now())) {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".into()),
        Ok(Err(why)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
    }
}

/// The readiness that `status` publishes.
#[must_use]
pub fn readiness(status: &SharedStatus) -> Arc<Readiness> {
    status
        .read()
        .map(|s| Arc::clone(&s.readiness))
        .unwrap_or_default()
}

/// `/v1/explain?target=ADDR:PORT/PROTO[&from=IP]`.
async fn explain_handler(
    State(status): State<SharedStatus>,
    uri: axum::http::Uri,
) -> Result<Json<explain::Explanation>, (StatusCode, String)> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, m + "\n");
    let mut target = None;
    let mut from = None;
    for pair in uri.query().unwrap_or_default().split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value);
        match key {
            "target" => target = Some(value.parse::<explain::Target>().map_err(bad)?),
            "from" => {
                from = Some(
                    value
                        .parse::<std::net::IpAddr>()
                        .map_err(|e| bad(format!("from: {value:?}: {e}")))?,
                );
            }
            _ => {}
        }
    }
    let target = target.ok_or_else(|| bad("target=ADDR:PORT[/PROTO] is missing".into()))?;
    let sender = status.read().ok().and_then(|s| s.explain.clone());
    let unavailable = || {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is not programming yet\n".to_owned(),
        )
    };
    let sender = sender.ok_or_else(unavailable)?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    sender
        .send(explain::Query {
            target,
            from,
            reply,
        })
        .await
        .map_err(|_| unavailable())?;
    tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .map_err(|_| unavailable())?
        .map(Json)
        .map_err(|_| unavailable())
}

/// `%XX` escapes decoded (the CLI escapes IPv6 brackets).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Asks a running agent to explain `target` for `from`.
///
/// # Errors
/// When the agent cannot be reached or answers something else.
pub fn fetch_explanation(
    addr: SocketAddr,
    target: explain::Target,
    from: Option<std::net::IpAddr>,
) -> anyhow::Result<explain::Explanation> {
    let escape = |s: String| s.replace('[', "%5B").replace(']', "%5D");
    let mut path = format!("/v1/explain?target={}", escape(target.to_string()));
    if let Some(from) = from {
        path += &format!("&from={}", escape(from.to_string()));
    }
    Ok(serde_json::from_str(&http_get(addr, &path)?)?)
}

/// The kubelet's Service variables for a pod of the namespace, as `export` lines.
async fn env(State(dns): State<SharedDnsIndex>, Path(namespace): Path<String>) -> String {
    let index = dns
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    crate::env::exports(&crate::env::variables(&index, &namespace))
}

async fn frontends(State(status): State<SharedStatus>) -> Json<Vec<FrontendView>> {
    Json(status.read().map(|s| views(&s.desired)).unwrap_or_default())
}

/// Fetches `/v1/frontends` from a running agent (a plain blocking HTTP/1.0 GET: the CLI
/// needs nothing more).
///
/// # Errors
/// When the agent cannot be reached or answers something else.
pub fn fetch_frontends(addr: SocketAddr) -> anyhow::Result<Vec<FrontendView>> {
    Ok(serde_json::from_str(&http_get(addr, "/v1/frontends")?)?)
}

/// Fetches `/v1/env/<namespace>` (the kubelet's Service variables as `export` lines).
///
/// # Errors
/// When the agent cannot be reached or answers something else.
pub fn fetch_env(addr: SocketAddr, namespace: &str) -> anyhow::Result<String> {
    http_get(addr, &format!("/v1/env/{namespace}"))
}

/// The body of a 200 answer to `GET path` (a plain blocking HTTP/1.0 GET: the CLI needs
/// nothing more).
fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let timeout = Duration::from_secs(10);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP response from {addr}"))?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{addr}: {} {}",
        head.lines().next().unwrap_or_default(),
        body.trim()
    );
    Ok(body.to_owned())
}
