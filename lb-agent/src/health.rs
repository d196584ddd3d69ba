//! `healthCheckNodePort` servers, as kube-proxy runs them: for each LoadBalancer Service with
//! `externalTrafficPolicy: Local`, an HTTP server on its health check port (IPv4 and IPv6)
//! answers any path with 200 and
//! `{"service":{"namespace":..,"name":..},"localEndpoints":N,"serviceProxyHealthy":true}`
//! while this node has endpoints of the Service and the agent is healthy (its syncs keep
//! up, see [`crate::proxy_health`]), and 503 otherwise, so the load balancer sends traffic
//! only to nodes that can serve it locally.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
    time::Instant,
};

use axum::{Router, extract::State, http::StatusCode, response::Response};
use serde::Serialize;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{
    model::{HealthCheck, ObjectRef},
    proxy_health::{ProxyHealth, json_response},
};

/// The answer's body.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Body {
    pub service: ObjectRef,
    pub local_endpoints: usize,
    /// Whether the agent itself is healthy (its syncs keep up).
    pub service_proxy_healthy: bool,
}

/// The status code and body for a check, `proxy_healthy` the agent's own health.
#[must_use]
pub fn answer(check: &HealthCheck, proxy_healthy: bool) -> (StatusCode, Body) {
    let status = if check.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Body {
        service: check.service.clone(),
        local_endpoints: check.local_endpoints,
        service_proxy_healthy: proxy_healthy,
    };
    (status, body)
}

type Shared = Arc<RwLock<Option<HealthCheck>>>;

/// The running servers, one per port (a listener per address family).
pub struct HealthServers {
    health: Arc<ProxyHealth>,
    servers: BTreeMap<u16, (Shared, Vec<JoinHandle<()>>)>,
}

impl HealthServers {
    /// No servers yet; `health` is the agent's own health, part of every answer.
    #[must_use]
    pub const fn new(health: Arc<ProxyHealth>) -> Self {
        Self {
            health,
            servers: BTreeMap::new(),
        }
    }

    /// Serves exactly `checks`: starts servers for new ports, updates the answers of the
    /// others, stops those no Service wants any more. A port that cannot be bound is
    /// reported and tried again on the next update.
    pub async fn update(&mut self, checks: &BTreeMap<u16, HealthCheck>) {
        let gone: Vec<u16> = self
            .servers
            .keys()
            .filter(|p| !checks.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            if let Some((_, tasks)) = self.servers.remove(&port) {
                tasks.iter().for_each(JoinHandle::abort);
                info!(port, "health check server stopped");
            }
        }
        for (port, check) in checks {
            if let Some((shared, _)) = self.servers.get(port) {
                if let Ok(mut current) = shared.write() {
                    *current = Some(check.clone());
                }
                continue;
            }
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
            let listeners = match crate::listen::bind_all(addr) {
                Ok(listeners) => listeners,
                Err(e) => {
                    warn!(port, service = %check.service, error = %e, "cannot serve healthCheckNodePort");
                    continue;
                }
            };
            let shared: Shared = Arc::new(RwLock::new(Some(check.clone())));
            let app = Router::new()
                .fallback(respond)
                .with_state((Arc::clone(&shared), Arc::clone(&self.health)));
            let tasks = listeners
                .into_iter()
                .map(|listener| {
                    let app = app.clone();
                    tokio::spawn(async move {
                        if let Err(e) = crate::listen::serve_http(listener, app).await {
                            warn!(error = %e, "health check server failed");
                        }
                    })
                })
                .collect();
            info!(port, service = %check.service, "health check server started");
            self.servers.insert(*port, (shared, tasks));
        }
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for (_, tasks) in self.servers.values() {
            tasks.iter().for_each(JoinHandle::abort);
        }
    }
}

async fn respond(State((shared, health)): State<(Shared, Arc<ProxyHealth>)>) -> Response {
    let check = shared.read().ok().and_then(|c| c.clone());
    match check {
        Some(check) => {
            let (status, body) = answer(&check, health.is_healthy(Instant::now()));
            json_response(status, serde_json::to_string(&body).unwrap_or_default())
        }
        None => json_response(StatusCode::SERVICE_UNAVAILABLE, "null".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_like_kube_proxy() {
        let mut check = HealthCheck {
            port: 32000,
            service: ObjectRef::new("default", "web"),
            local_endpoints: 2,
        };
        let (status, body) = answer(&check, true);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"service":{"namespace":"default","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        );
        // An agent whose syncs lag answers 503 even with local endpoints.
        let (status, body) = answer(&check, false);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!body.service_proxy_healthy);
        check.local_endpoints = 0;
        assert_eq!(answer(&check, true).0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
