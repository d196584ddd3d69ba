//! The agent's HTTP endpoint (`--api-addr`): `/healthz` (the process serves), `/readyz`
//! (the datapath is attached and the first sync done), and `/v1/frontends`, the desired
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
    model::{DesiredState, EndpointInfo},
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
    pub ready: bool,
    /// The desired state, kept up to date frontend by frontend.
    pub desired: DesiredState,
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
        .with_state(status)
        .merge(env);
    tracing::info!(addr = %listener.local_addr()?, "API listening");
    axum::serve(listener, app).await
}

async fn readyz(State(status): State<SharedStatus>) -> (StatusCode, &'static str) {
    let ready = status.read().is_ok_and(|s| s.ready);
    if ready {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
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
    Ok(serde_json::from_str(&fetch(addr, "/v1/frontends")?)?)
}

/// Fetches `/v1/env/<namespace>` (the kubelet's Service variables as `export` lines).
///
/// # Errors
/// When the agent cannot be reached or answers something else.
pub fn fetch_env(addr: SocketAddr, namespace: &str) -> anyhow::Result<String> {
    fetch(addr, &format!("/v1/env/{namespace}"))
}

/// A plain blocking HTTP/1.0 GET of `path`; the body.
fn fetch(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let timeout = Duration::from_secs(2);
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
        "{addr}: {}",
        head.lines().next().unwrap_or_default()
    );
    Ok(body.to_string())
}
