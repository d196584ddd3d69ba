//! `healthCheckNodePort` servers, as kube-proxy runs them: for each LoadBalancer Service with
//! `externalTrafficPolicy: Local`, an HTTP server on its health check port answers any path
//! with 200 and `{"service":{"namespace":..,"name":..},"localEndpoints":N}` while this node
//! has endpoints of the Service, and 503 when it has none, so the load balancer sends
//! traffic only to nodes that can serve it locally.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use axum::{Json, Router, extract::State, http::StatusCode};
use serde::Serialize;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::model::{HealthCheck, ObjectRef};

/// The answer's body.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Body {
    pub service: ObjectRef,
    pub local_endpoints: usize,
}

/// The status code and body for a check.
#[must_use]
pub fn answer(check: &HealthCheck) -> (StatusCode, Body) {
    let status = if check.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Body {
        service: check.service.clone(),
        local_endpoints: check.local_endpoints,
    };
    (status, body)
}

type Shared = Arc<RwLock<Option<HealthCheck>>>;

/// The running servers, one per port.
#[derive(Default)]
pub struct HealthServers {
    servers: BTreeMap<u16, (Shared, JoinHandle<()>)>,
}

impl HealthServers {
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
            if let Some((_, task)) = self.servers.remove(&port) {
                task.abort();
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
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => listener,
                Err(e) => {
                    warn!(port, service = %check.service, error = %e, "cannot serve healthCheckNodePort");
                    continue;
                }
            };
            let shared: Shared = Arc::new(RwLock::new(Some(check.clone())));
            let app = Router::new()
                .fallback(respond)
                .with_state(Arc::clone(&shared));
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    warn!(error = %e, "health check server failed");
                }
            });
            info!(port, service = %check.service, "health check server started");
            self.servers.insert(*port, (shared, task));
        }
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for (_, task) in self.servers.values() {
            task.abort();
        }
    }
}

async fn respond(State(shared): State<Shared>) -> (StatusCode, Json<serde_json::Value>) {
    let check = shared.read().ok().and_then(|c| c.clone());
    match check {
        Some(check) => {
            let (status, body) = answer(&check);
            (status, Json(serde_json::to_value(body).unwrap_or_default()))
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::Value::Null),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_like_kube_proxy() {
        let mut check = HealthCheck {
            port: 32000,
            service: ObjectRef {
                namespace: "default".into(),
                name: "web".into(),
            },
            local_endpoints: 2,
        };
        let (status, body) = answer(&check);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"service":{"namespace":"default","name":"web"},"localEndpoints":2}"#
        );
        check.local_endpoints = 0;
        assert_eq!(answer(&check).0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
