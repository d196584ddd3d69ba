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

use crate::{model::ObjectRef, node::ThisNode, state::ClusterState, translate::Sourced};

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
    /// A watch failed; it retries with backoff on its own.
    Error(String),
}

/// A client from `kubeconfig`, or else as kube-rs infers it (`KUBECONFIG`, `~/.kube/config`,
/// then the in-cluster service account).
///
/// # Errors
/// When no configuration can be found or it is invalid.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Starts the watches (with kube-rs's default backoff and bookmarks): Services,
/// EndpointSlices and, with `node_name`, that one Node (a `metadata.name` field selector,
/// as kube-proxy's node informer). Their events arrive on the returned channel, in order
/// per resource.
pub fn watch(client: &Client, node_name: Option<&str>) -> mpsc::Receiver<Update> {
    let (tx, rx) = mpsc::channel(4096);
    let config = watcher::Config::default().labels(LABEL_SELECTOR);
    let services = watcher(Api::<Service>::all(client.clone()), config.clone()).default_backoff();
    let slices = watcher(Api::<EndpointSlice>::all(client.clone()), config).default_backoff();
    if let Some(name) = node_name {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let node = watcher(Api::<Node>::all(client.clone()), config).default_backoff();
        tokio::spawn(forward(node, tx.clone(), Update::Node));
    }
    tokio::spawn(forward(services, tx.clone(), Update::Service));
    tokio::spawn(forward(slices, tx, Update::Slice));
    rx
}

async fn forward<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    tx: mpsc::Sender<Update>,
    wrap: fn(watcher::Event<K>) -> Update,
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        let update = match item {
            Ok(event) => wrap(event),
            Err(e) => Update::Error(e.to_string()),
        };
        if tx.send(update).await.is_err() {
            return;
        }
    }
}

/// Applies watch events to the model. A relist (`Init` … `InitDone`) is buffered and then
/// replaces the resource's objects at once, so objects present before and after it are
/// not touched and what was deleted meanwhile goes away.
#[derive(Debug)]
pub struct WatchApplier {
    services: Option<Vec<Sourced<Service>>>,
    slices: Option<Vec<Sourced<EndpointSlice>>>,
    /// A relist of the Node in progress: `Some(None)` until the Node comes.
    node_relist: Option<Option<Node>>,
    node: ThisNode,
    services_listed: bool,
    slices_listed: bool,
    node_listed: bool,
}

impl WatchApplier {
    /// An applier for the watches [`watch`] starts with `node_name`.
    #[must_use]
    pub fn new(node_name: Option<String>) -> Self {
        Self {
            services: None,
            slices: None,
            node_relist: None,
            // Without a node name there is no Node watch to wait for.
            node_listed: node_name.is_none(),
            node: ThisNode::new(node_name),
            services_listed: false,
            slices_listed: false,
        }
    }

    /// Whether every resource has completed its initial list: nothing may be programmed
    /// before, or Services would flap to empty at start-up (and, without the Node, to
    /// endpoints of no particular zone).
    #[must_use]
    pub const fn initial_lists_done(&self) -> bool {
        self.services_listed && self.slices_listed && self.node_listed
    }

    /// This node, as its Node object last showed it.
    #[must_use]
    pub const fn node(&self) -> &ThisNode {
        &self.node
    }

    /// Applies one event.
    pub fn apply(&mut self, state: &mut ClusterState, update: Update) {
        match update {
            Update::Service(event) => match event {
                watcher::Event::Init => self.services = Some(Vec::new()),
                watcher::Event::InitApply(o) => {
                    self.services.get_or_insert_default().push(sourced(o))
                }
                watcher::Event::InitDone => {
                    state.replace_services(self.services.take().unwrap_or_default());
                    self.services_listed = true;
                }
                watcher::Event::Apply(o) => state.apply_service(sourced(o)),
                watcher::Event::Delete(o) => state.delete_service(&ObjectRef::of(&o.metadata)),
            },
            Update::Slice(event) => match event {
                watcher::Event::Init => self.slices = Some(Vec::new()),
                watcher::Event::InitApply(o) => {
                    self.slices.get_or_insert_default().push(sourced(o))
                }
                watcher::Event::InitDone => {
                    state.replace_slices(self.slices.take().unwrap_or_default());
                    self.slices_listed = true;
                }
                watcher::Event::Apply(o) => state.apply_slice(sourced(o)),
                watcher::Event::Delete(o) => state.delete_slice(&ObjectRef::of(&o.metadata)),
            },
            Update::Node(event) => {
                match event {
                    watcher::Event::Init => self.node_relist = Some(None),
                    watcher::Event::InitApply(o) => self.node_relist = Some(Some(o)),
                    watcher::Event::InitDone => {
                        match self.node_relist.take().flatten() {
                            Some(node) => self.node.apply(&node),
                            // Not in the list: gone (its last state unknown).
                            None => {
                                let name = self.node.name().unwrap_or_default().to_string();
                                self.node.delete(&name, None);
                            }
                        }
                        self.node_listed = true;
                    }
                    watcher::Event::Apply(o) => self.node.apply(&o),
                    watcher::Event::Delete(o) => {
                        let name = o.metadata.name.clone().unwrap_or_default();
                        self.node.delete(&name, Some(&o));
                    }
                }
                state.set_node_zone(self.node.zone());
            }
            Update::Error(error) => {
                warn!(%error, "watch failed; retrying with backoff (the maps stay as they are)")
            }
        }
    }
}

/// Wraps an object from the API, dropping the metadata the translation never reads
/// (`managedFields`, annotations such as `kubectl.kubernetes.io/last-applied-configuration`):
/// in a real cluster they are most of an object's size.
fn sourced<T: kube::Resource>(mut object: T) -> Sourced<T> {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
    Sourced {
        origin: ORIGIN.with(Clone::clone),
        object,
    }
}
