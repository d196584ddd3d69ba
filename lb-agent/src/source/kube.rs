//! The API server source: kube-rs watchers over Services and EndpointSlices, and over this
//! node's own Node object (with `--node-name`).

/// An API resource the agent reads, and the verbs it uses on it: the RBAC rules in
/// `deploy/` must grant exactly these (a test checks it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiAccess {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// Plural resource name.
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// Everything the agent reads from the API server.
pub const API_ACCESS: [ApiAccess; 3] = [
    ApiAccess {
        group: "",
        resource: "services",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
    },
    // Its own Node only (a field selector on its name): the zone label for topology-aware
    // routing and the deletion marks for /healthz. `get` as kube-proxy's role has it.
    ApiAccess {
        group: "",
        resource: "nodes",
        verbs: &["get", "list", "watch"],
    },
];

use std::{path::Path, sync::Arc};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::mpsc;
use tracing::warn;

use crate::source::{
    api_guard,
    change::{Change, Kind, Object},
};

/// The label selector of both watches, as kube-proxy's: Services another proxy owns, and
/// the EndpointSlices of headless Services, are filtered by the API server.
pub const LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

thread_local! {
    /// The `origin` of objects from the API server, in problem reports (shared, not one
    /// allocation per object).
    static ORIGIN: Arc<str> = Arc::from("api");
}

/// A watch event of any of the resources.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "moved once through a channel; boxing would cost an allocation per event"
)]
pub enum Update {
    Service(watcher::Event<Service>),
    Slice(watcher::Event<EndpointSlice>),
    /// This node's Node object.
    Node(watcher::Event<Node>),
    /// A watch of `resource` failed; it retries with backoff on its own.
    Error {
        resource: Kind,
        error: String,
    },
}

/// A client from `kubeconfig`, or else as kube-rs infers it (`KUBECONFIG`, `~/.kube/config`,
/// then the in-cluster service account), behind the [`api_guard`](super::api_guard) (which
/// honours `Retry-After` itself and slows down watches that end at once), and the receiver
/// of the guard's reports, for [`watch`]; `on_hold` hears of each `Retry-After`.
///
/// # Errors
/// When no configuration can be found or it is invalid.
pub async fn client(
    kubeconfig: Option<&Path>,
    on_hold: impl Fn(Kind, std::time::Instant) + Send + Sync + 'static,
) -> anyhow::Result<(Client, mpsc::UnboundedReceiver<api_guard::Report>)> {
    let mut config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await?,
    };
    // A 429 or 503 reaches the watch (and is reported) instead of being retried silently
    // up to 15 times; the guard holds the next requests back for its Retry-After.
    config.default_retry = false;
    let (guard, reports) = api_guard::Guard::new(on_hold);
    let client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&api_guard::GuardLayer(guard))
        .build();
    Ok((client, reports))
}

/// Starts the watches (with kube-rs's default backoff and bookmarks): Services,
/// EndpointSlices and, with `node_name`, that one Node (a `metadata.name` field selector,
/// as kube-proxy's node informer). Their events arrive on the returned channel, in order
/// per resource.
pub fn watch(
    client: &Client,
    node_name: Option<&str>,
    mut guard_reports: mpsc::UnboundedReceiver<api_guard::Report>,
) -> mpsc::Receiver<Update> {
    let (tx, rx) = mpsc::channel(4096);
    let reports_tx = tx.clone();
    tokio::spawn(async move {
        while let Some((resource, error)) = guard_reports.recv().await {
            if reports_tx
                .send(Update::Error { resource, error })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let config = watcher::Config::default().labels(LABEL_SELECTOR);
    let services = watcher(Api::<Service>::all(client.clone()), config.clone()).default_backoff();
    let slices = watcher(Api::<EndpointSlice>::all(client.clone()), config).default_backoff();
    if let Some(name) = node_name {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let node = watcher(Api::<Node>::all(client.clone()), config).default_backoff();
        tokio::spawn(forward(node, tx.clone(), Kind::Node, Update::Node));
    }
    tokio::spawn(forward(
        services,
        tx.clone(),
        Kind::Service,
        Update::Service,
    ));
    tokio::spawn(forward(slices, tx, Kind::EndpointSlice, Update::Slice));
    rx
}

async fn forward<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    tx: mpsc::Sender<Update>,
    resource: Kind,
    wrap: fn(watcher::Event<K>) -> Update,
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        let update = match item {
            Ok(event) => wrap(event),
            Err(e) => Update::Error {
                resource,
                error: e.to_string(),
            },
        };
        if tx.send(update).await.is_err() {
            return;
        }
    }
}

/// Turns watch events into [`Change`]s. A relist (`Init` … `InitDone`) becomes
/// [`Change::Relisting`], the listed objects, and [`Change::Relisted`]: each object goes to
/// the model as it arrives (validated and dropped there, never buffered whole), and what
/// the relist did not list goes away at its end.
#[derive(Debug)]
pub struct WatchApplier {
    services_listed: bool,
    slices_listed: bool,
    node_listed: bool,
}

impl WatchApplier {
    /// An applier for the watches [`watch`] starts (with a Node watch when `node_watch`).
    #[must_use]
    pub const fn new(node_watch: bool) -> Self {
        Self {
            services_listed: false,
            slices_listed: false,
            // Without a node name there is no Node watch to wait for.
            node_listed: !node_watch,
        }
    }

    /// Whether every resource has completed its initial list: nothing may be programmed
    /// before, or Services would flap to empty at start-up (and, without the Node, to
    /// endpoints of no particular zone).
    #[must_use]
    pub const fn initial_lists_done(&self) -> bool {
        self.services_listed && self.slices_listed && self.node_listed
    }

    /// The changes one event makes, handed to `emit` in order.
    pub fn convert(&mut self, update: Update, mut emit: impl FnMut(Change)) {
        match update {
            Update::Service(event) => {
                if self.event(
                    Kind::Service,
                    event,
                    |o| Object::Service(Box::new(o)),
                    &mut emit,
                ) {
                    self.services_listed = true;
                }
            }
            Update::Slice(event) => {
                let wrap = |o| Object::EndpointSlice(Box::new(o));
                if self.event(Kind::EndpointSlice, event, wrap, &mut emit) {
                    self.slices_listed = true;
                }
            }
            Update::Node(watcher::Event::Delete(o)) => {
                // The final state gives the eligibility (a graceful deletion carries a
                // `deletionTimestamp`); then the Node is gone.
                let object = Object::Node(Box::new(o));
                let id = object.id();
                emit(Change::Apply {
                    origin: ORIGIN.with(Clone::clone),
                    object,
                });
                emit(Change::Delete {
                    kind: Kind::Node,
                    id,
                });
            }
            Update::Node(event) => {
                if self.event(Kind::Node, event, |o| Object::Node(Box::new(o)), &mut emit) {
                    self.node_listed = true;
                }
            }
            Update::Error { resource, error } => {
                warn!(%resource, %error, "watch failed; retrying with backoff (the maps stay as they are)")
            }
        }
    }

    /// The changes of one event of `kind`; true when it completed a relist.
    fn event<K: kube::Resource>(
        &self,
        kind: Kind,
        event: watcher::Event<K>,
        wrap: impl Fn(K) -> Object,
        emit: &mut impl FnMut(Change),
    ) -> bool {
        let apply = |object| Change::Apply {
            origin: ORIGIN.with(Clone::clone),
            object: wrap(stripped(object)),
        };
        match event {
            watcher::Event::Init => emit(Change::Relisting(kind)),
            watcher::Event::InitApply(o) | watcher::Event::Apply(o) => emit(apply(o)),
            watcher::Event::InitDone => {
                emit(Change::Relisted(kind));
                return true;
            }
            watcher::Event::Delete(o) => emit(Change::Delete {
                kind,
                id: wrap(o).id(),
            }),
        }
        false
    }
}

/// An object from the API without the metadata the translation never reads
/// (`managedFields`, annotations such as `kubectl.kubernetes.io/last-applied-configuration`);
/// the annotations it reads ([`crate::translate::READ_ANNOTATIONS`]: source ranges,
/// topology mode) stay.
fn stripped<T: kube::Resource>(mut object: T) -> T {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.retain(|key, _| crate::translate::READ_ANNOTATIONS.contains(&key.as_str()));
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
    object
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;

    use super::*;

    /// The annotations lb acts on survive the stripping of what it never reads: a Service
    /// from the API keeps its `topology-mode` and source ranges.
    #[test]
    fn stripping_keeps_the_annotations_the_translation_reads() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web",
                "annotations": {
                    "service.kubernetes.io/topology-mode": "Auto",
                    "service.beta.kubernetes.io/load-balancer-source-ranges": "10.0.0.0/8",
                    "kubectl.kubernetes.io/last-applied-configuration": "{...}",
                    "endpoints.kubernetes.io/last-change-trigger-time": "2026-12-03T16:00:00Z",
                },
                "managedFields": [{"manager": "kubectl"}],
            },
        }))
        .unwrap();
        let meta = stripped(service).metadata;
        let kept: Vec<&str> = meta
            .annotations
            .iter()
            .flat_map(|a| a.keys().map(String::as_str))
            .collect();
        assert_eq!(
            kept,
            [
                "endpoints.kubernetes.io/last-change-trigger-time",
                "service.beta.kubernetes.io/load-balancer-source-ranges",
                "service.kubernetes.io/topology-mode"
            ]
        );
        assert_eq!(meta.managed_fields, None);
    }
}
