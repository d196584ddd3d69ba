//! kube-proxy's node health server (`--healthz-bind-address`, default `0.0.0.0:10256`):
//! `/healthz` and `/livez`, with kube-proxy's status codes and JSON bodies, so load
//! balancers and probes written for kube-proxy work unchanged.
//!
//! Healthy means the datapath keeps up with the cluster: no change taken from the source
//! has waited longer than [`HEALTH_TIMEOUT`] without being written to the maps. A change
//! is *queued* when the source hands it over (a watch event, a re-read manifest file) and
//! *updated* when the sync that follows succeeds; a failing write keeps it queued until a
//! later sync succeeds. Before the first successful sync the agent counts as healthy, as
//! kube-proxy does while it starts (readiness is `--api-addr`'s `/readyz`).
//!
//! `/healthz` is also 503 while this node is not eligible for traffic (its Node is being
//! deleted or tainted `ToBeDeletedByClusterAutoscaler`), so load balancers drain it first;
//! `/livez` ignores eligibility (a liveness probe must not restart a draining agent).
use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// How long a change may wait unsynced before the agent is unhealthy: kube-proxy's,
/// twice its default `--sync-period` of 30 s. The agent writes every change as it comes
/// (its periodic work is the manifests rescan every 10 s), so a change older than this
/// means the writes are failing or the loop is stuck.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// The moment of an event or a request, on both clocks: the monotonic one for the
/// timeout, the wall clock for what the body shows.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub mono: Instant,
    pub wall: SystemTime,
}

impl Now {
    #[must_use]
    pub fn current() -> Self {
        Self {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Inner {
    /// The last successful sync.
    last_updated: Option<SystemTime>,
    /// The oldest change not yet synced.
    oldest_queued: Option<Instant>,
    node_eligible: bool,
}

/// The agent's health, shared by the reconcile loop, this server and the
/// `healthCheckNodePort` servers.
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    inner: RwLock<Inner>,
}

impl Default for ProxyHealth {
    fn default() -> Self {
        Self::new(HEALTH_TIMEOUT)
    }
}

/// Which endpoint answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Sync health and node eligibility.
    Healthz,
    /// Sync health only.
    Livez,
}

/// An answer: status and the JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    pub body: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
}

impl ProxyHealth {
    #[must_use]
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            inner: RwLock::new(Inner {
                last_updated: None,
                oldest_queued: None,
                node_eligible: true,
            }),
        }
    }

    fn read(&self) -> Inner {
        *self
            .inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self, change: impl FnOnce(&mut Inner)) {
        change(
            &mut self
                .inner
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
    }

    /// A change arrived that the maps do not show yet (the oldest such moment counts).
    pub fn queued(&self, now: Instant) {
        self.write(|inner| {
            inner.oldest_queued.get_or_insert(now);
        });
    }

    /// A sync succeeded: the maps show everything queued before it.
    pub fn updated(&self, now: Now) {
        self.write(|inner| {
            inner.oldest_queued = None;
            inner.last_updated = Some(now.wall);
        });
    }

    /// Whether this node is eligible for traffic (from its Node object).
    pub fn set_node_eligible(&self, eligible: bool) {
        self.write(|inner| inner.node_eligible = eligible);
    }

    /// Whether this node is eligible for traffic, as last set.
    #[must_use]
    pub fn node_eligible(&self) -> bool {
        self.read().node_eligible
    }

    /// Sync health alone (what `/livez` and the `healthCheckNodePort` servers use).
    #[must_use]
    pub fn is_healthy(&self, now: Instant) -> bool {
        Self::healthy(&self.read(), self.timeout, now)
    }

    fn healthy(inner: &Inner, timeout: Duration, now: Instant) -> bool {
        // Starting up (never synced) or nothing waiting: healthy; otherwise healthy while
        // the oldest waiting change is younger than the timeout.
        inner.last_updated.is_none()
            || inner
                .oldest_queued
                .is_none_or(|queued| now.saturating_duration_since(queued) < timeout)
    }

    /// What `endpoint` answers at `now`. As kube-proxy's: `lastUpdated` is the current
    /// time while healthy, the last successful sync otherwise; times in Go's `time.Time`
    /// format (UTC), the zero time for "never".
    #[must_use]
    pub fn answer(&self, endpoint: Endpoint, now: Now) -> Answer {
        let inner = self.read();
        let mut healthy = Self::healthy(&inner, self.timeout, now.mono);
        if endpoint == Endpoint::Healthz {
            healthy &= inner.node_eligible;
        }
        let last_updated = if healthy {
            Some(now.wall)
        } else {
            inner.last_updated
        };
        let body = Body {
            last_updated: go_time(last_updated),
            current_time: go_time(Some(now.wall)),
            node_eligible: (endpoint == Endpoint::Healthz).then_some(inner.node_eligible),
        };
        Answer {
            status: if healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            body: serde_json::to_string(&body).unwrap_or_default(),
        }
    }
}

/// A time as Go's `time.Time.String()` prints it in UTC (`2006-01-02 15:04:05.999999999
/// +0000 UTC`, without the monotonic reading Go appends), `None` as Go's zero time.
fn go_time(time: Option<SystemTime>) -> String {
    let stamp = time.and_then(|t| Timestamp::try_from(t).ok());
    match stamp {
        Some(stamp) => stamp.strftime("%Y-%m-%d %H:%M:%S%.f +0000 UTC").to_string(),
        None => "0001-01-01 00:00:00 +0000 UTC".to_string(),
    }
}

/// A JSON answer with kube-proxy's headers.
#[must_use]
pub fn json_response(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// Binds `addr` (both families when it is unspecified) and serves `/healthz` and `/livez`
/// until the returned tasks are aborted.
///
/// # Errors
/// When the address cannot be bound.
pub fn serve(addr: SocketAddr, health: Arc<ProxyHealth>) -> std::io::Result<Vec<JoinHandle<()>>> {
    let listeners = crate::listen::bind_all(addr)?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(health);
    Ok(listeners
        .into_iter()
        .map(|listener| {
            let app = app.clone();
            tokio::spawn(async move {
                if let Ok(local) = listener.local_addr() {
                    info!(addr = %local, "node health server listening");
                }
                if let Err(e) = crate::listen::serve_http(listener, app).await {
                    warn!(error = %e, "node health server failed");
                }
            })
        })
        .collect())
}

async fn healthz(State(health): State<Arc<ProxyHealth>>) -> Response {
    respond(&health, Endpoint::Healthz)
}

async fn livez(State(health): State<Arc<ProxyHealth>>) -> Response {
    respond(&health, Endpoint::Livez)
}

fn respond(health: &ProxyHealth, endpoint: Endpoint) -> Response {
    let Answer { status, body } = health.answer(endpoint, Now::current());
    json_response(status, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Now, secs: u64) -> Now {
        Now {
            mono: start.mono + Duration::from_secs(secs),
            wall: start.wall + Duration::from_secs(secs),
        }
    }

    fn json(answer: &Answer) -> serde_json::Value {
        serde_json::from_str(&answer.body).expect("JSON body")
    }

    #[test]
    fn fresh_stale_and_ineligible() {
        let start = Now {
            mono: Instant::now(),
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        };
        let health = ProxyHealth::new(Duration::from_secs(60));

        // Starting up: healthy, even with a change waiting, and lastUpdated is now.
        health.queued(start.mono);
        let answer = health.answer(Endpoint::Healthz, at(start, 100));
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.body,
            r#"{"lastUpdated":"2023-11-14 22:15:00 +0000 UTC","currentTime":"2023-11-14 22:15:00 +0000 UTC","nodeEligible":true}"#
        );

        // Synced, then a change waits: healthy until it is 60 s old.
        health.updated(at(start, 100));
        health.queued(at(start, 110).mono);
        health.queued(at(start, 150).mono);
        assert_eq!(
            health.answer(Endpoint::Healthz, at(start, 169)).status,
            StatusCode::OK
        );
        assert!(health.is_healthy(at(start, 169).mono));
        let stale = health.answer(Endpoint::Healthz, at(start, 170));
        assert_eq!(stale.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            json(&stale)["lastUpdated"],
            "2023-11-14 22:15:00 +0000 UTC",
            "the last successful sync"
        );
        assert_eq!(json(&stale)["currentTime"], "2023-11-14 22:16:10 +0000 UTC");
        let livez = health.answer(Endpoint::Livez, at(start, 170));
        assert_eq!(livez.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!health.is_healthy(at(start, 170).mono));

        // The sync succeeds: healthy again.
        health.updated(at(start, 171));
        assert_eq!(
            health.answer(Endpoint::Healthz, at(start, 172)).status,
            StatusCode::OK
        );

        // Ineligible: /healthz 503 (lastUpdated the last sync), /livez 200 without the
        // eligibility field.
        health.set_node_eligible(false);
        let ineligible = health.answer(Endpoint::Healthz, at(start, 172));
        assert_eq!(ineligible.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&ineligible)["nodeEligible"], false);
        assert_eq!(
            json(&ineligible)["lastUpdated"],
            "2023-11-14 22:16:11 +0000 UTC"
        );
        let livez = health.answer(Endpoint::Livez, at(start, 172));
        assert_eq!(livez.status, StatusCode::OK);
        assert_eq!(
            livez.body,
            r#"{"lastUpdated":"2023-11-14 22:16:12 +0000 UTC","currentTime":"2023-11-14 22:16:12 +0000 UTC"}"#
        );
        assert!(health.is_healthy(at(start, 172).mono), "eligibility aside");
    }

    #[test]
    fn go_time_format() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 120_000_000);
        assert_eq!(go_time(Some(t)), "2023-11-14 22:13:20.12 +0000 UTC");
        assert_eq!(go_time(None), "0001-01-01 00:00:00 +0000 UTC");
    }
}
