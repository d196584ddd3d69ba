//! The agent's manners towards a misbehaving API server, as a layer of the kube client (the
//! outermost, so it sees each request the watches make):
//! - `Retry-After` (on a 429 or 503) is honoured for the next requests for that resource:
//!   they wait until then. kube-client's own retry layer is off, so such an answer reaches
//!   the watch as an error at once and is reported (log, `lb_watch_restarts_total`,
//!   readiness) instead of being retried silently 15 times.
//! - A watch that ends at once, again and again (a proxy cutting the stream, a truncated
//!   answer: kube-client takes a body that ends half-way through an event for the end of
//!   the watch, and kube-runtime watches again at once, hundreds of times a second), is
//!   slowed down with a doubling delay and reported as a failure of that resource, as the
//!   watches themselves would not.
use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{Request, Response, StatusCode, header::RETRY_AFTER};
use kube::client::{Body, DynBody};
use tokio::sync::mpsc;
use tower::{BoxError, Layer, Service, util::BoxService};

use crate::source::change::Kind;

/// The service stack the kube client builds (`kube::client::ClientBuilder::try_from`).
pub type ClientService = BoxService<Request<Body>, Response<Box<DynBody>>, BoxError>;

/// A watch that starts again sooner than this after the previous one started ended at once.
const QUICK_END: Duration = Duration::from_secs(1);
/// Watches ending at once allowed in a row before they are slowed down.
const QUICK_ENDS_ALLOWED: u32 = 3;
/// The first delay, doubled each time, and its cap.
const FIRST_DELAY: Duration = Duration::from_millis(500);
const MAX_DELAY: Duration = Duration::from_secs(10);
/// The longest `Retry-After` taken at its word.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// A failure the watches do not report themselves: (resource, what happened).
pub type Report = (Kind, String);

/// Per-resource state, shared by every request.
pub struct Guard {
    resources: Mutex<HashMap<Kind, ResourceState>>,
    reports: mpsc::UnboundedSender<Report>,
    /// Told when the API server holds a resource's requests back (`Retry-After`), so the
    /// agent's readiness knows its watch cannot recover before then.
    on_hold: Box<dyn Fn(Kind, Instant) + Send + Sync>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("resources", &self.resources)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct ResourceState {
    /// No request before this (`Retry-After`).
    not_before: Option<Instant>,
    /// When the last watch started (after its delay).
    last_watch: Option<Instant>,
    /// Watches in a row that started within [`QUICK_END`] of the previous one.
    quick_ends: u32,
}

impl Guard {
    /// A guard that tells `on_hold` of each `Retry-After`, and the receiver of its reports.
    #[must_use]
    pub fn new(
        on_hold: impl Fn(Kind, Instant) + Send + Sync + 'static,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Report>) {
        let (reports, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Self {
                resources: Mutex::new(HashMap::new()),
                reports,
                on_hold: Box::new(on_hold),
            }),
            rx,
        )
    }

    /// How long a request for `kind` (a watch when `watch`) made `now` must wait.
    pub fn before_request(&self, kind: Kind, watch: bool, now: Instant) -> Duration {
        let mut resources = self
            .resources
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let state = resources.entry(kind).or_default();
        let mut delay = state
            .not_before
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
        if !watch {
            // A list starts afresh: the watch after it is the first of its kind.
            state.last_watch = None;
            state.quick_ends = 0;
            return delay;
        }
        let quick = state
            .last_watch
            .is_some_and(|t| now.saturating_duration_since(t) < QUICK_END);
        state.quick_ends = if quick { state.quick_ends + 1 } else { 0 };
        if state.quick_ends >= QUICK_ENDS_ALLOWED {
            let doublings = (state.quick_ends - QUICK_ENDS_ALLOWED).min(16);
            let backoff = FIRST_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY);
            delay = delay.max(backoff);
            let _ = self.reports.send((
                kind,
                format!(
                    "the watch ended at once {} times in a row (a truncated or empty answer?); \
                     watching again in {backoff:?}",
                    state.quick_ends
                ),
            ));
        }
        state.last_watch = Some(now + delay);
        delay
    }

    /// Notes the answer to a request for `kind`: a `Retry-After` holds back the next ones.
    pub fn after_response(&self, kind: Kind, status: StatusCode, retry_after: Option<&str>) {
        if !matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            return;
        }
        let Some(secs) = retry_after.and_then(|v| v.trim().parse::<u64>().ok()) else {
            return;
        };
        let until = Instant::now() + Duration::from_secs(secs).min(MAX_RETRY_AFTER);
        let mut resources = self
            .resources
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        resources.entry(kind).or_default().not_before = Some(until);
        drop(resources);
        (self.on_hold)(kind, until);
    }
}

/// The resource a request is for, from its path, and whether it is a watch.
fn classify<B>(request: &Request<B>) -> Option<(Kind, bool)> {
    let path = request.uri().path();
    let kind = match path.rsplit('/').next()? {
        "services" => Kind::Service,
        "endpointslices" => Kind::EndpointSlice,
        "nodes" => Kind::Node,
        _ => return None,
    };
    let watch = request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    Some((kind, watch))
}

/// The layer.
#[derive(Clone, Debug)]
pub struct GuardLayer(pub Arc<Guard>);

impl Layer<ClientService> for GuardLayer {
    type Service = Guarded;

    fn layer(&self, inner: ClientService) -> Guarded {
        Guarded {
            inner,
            guard: Arc::clone(&self.0),
        }
    }
}

/// The client's service behind the guard.
pub struct Guarded {
    inner: ClientService,
    guard: Arc<Guard>,
}

impl Service<Request<Body>> for Guarded {
    type Response = Response<Box<DynBody>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let class = classify(&request);
        let delay = class.map_or(Duration::ZERO, |(kind, watch)| {
            self.guard.before_request(kind, watch, Instant::now())
        });
        // The client's future does nothing until polled: the request leaves after the delay.
        let answer = self.inner.call(request);
        let guard = Arc::clone(&self.guard);
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let response = answer.await?;
            if let Some((kind, _)) = class {
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok());
                guard.after_response(kind, response.status(), retry_after);
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_ending_at_once_are_slowed_down_and_reported() {
        let (guard, mut reports) = Guard::new(|_, _| {});
        let mut now = Instant::now();
        let mut delays = Vec::new();
        for _ in 0..6 {
            let delay = guard.before_request(Kind::Service, true, now);
            delays.push(delay);
            now += delay + Duration::from_millis(5);
        }
        assert_eq!(
            delays,
            [0, 0, 0, 500, 1000, 2000].map(Duration::from_millis),
            "three quick ends allowed, then doubling"
        );
        let (kind, what) = reports.try_recv().expect("reported");
        assert_eq!(kind, Kind::Service);
        assert!(what.contains("3 times in a row"), "{what}");
        // A watch that lasted starts the count again; so does a list.
        now += Duration::from_secs(300);
        assert_eq!(
            guard.before_request(Kind::Service, true, now),
            Duration::ZERO
        );
        assert_eq!(
            guard.before_request(Kind::EndpointSlice, true, now),
            Duration::ZERO,
            "per resource"
        );
    }

    #[test]
    fn retry_after_holds_back_the_next_requests_of_that_resource() {
        let (guard, _reports) = Guard::new(|_, _| {});
        guard.after_response(Kind::Service, StatusCode::TOO_MANY_REQUESTS, Some("2"));
        let delay = guard.before_request(Kind::Service, false, Instant::now());
        assert!(delay > Duration::from_millis(1900) && delay <= Duration::from_secs(2));
        assert_eq!(
            guard.before_request(Kind::EndpointSlice, false, Instant::now()),
            Duration::ZERO
        );
        guard.after_response(Kind::Node, StatusCode::INTERNAL_SERVER_ERROR, Some("5"));
        assert_eq!(
            guard.before_request(Kind::Node, false, Instant::now()),
            Duration::ZERO
        );
    }

    #[test]
    fn requests_are_classified_by_resource_and_verb() {
        let request = |uri: &str| Request::get(uri).body(()).unwrap();
        assert_eq!(
            classify(&request(
                "/api/v1/services?labelSelector=x&watch=true&resourceVersion=5"
            )),
            Some((Kind::Service, true))
        );
        assert_eq!(
            classify(&request(
                "/apis/discovery.k8s.io/v1/endpointslices?limit=500"
            )),
            Some((Kind::EndpointSlice, false))
        );
        assert_eq!(classify(&request("/version")), None);
    }
}
