//! Helpers shared by the integration tests: a real `kube::Client` built from the server's
//! kubeconfig, object builders, and bounded waits on watcher streams.

#![allow(dead_code)] // not every test binary uses every helper

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fake_apiserver::FakeApiServer;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Client, Config, ResourceExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long any single wait in a test may take before it fails.
pub const STEP: Duration = Duration::from_secs(15);

/// A kube client configured through the kubeconfig written by
/// [`FakeApiServer::write_kubeconfig`] (the way the agent is configured).
pub async fn client(server: &FakeApiServer) -> Client {
    static N: AtomicU32 = AtomicU32::new(0);
    let path: PathBuf = std::env::temp_dir().join(format!(
        "fake-apiserver-test-{}-{}.kubeconfig",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    server.write_kubeconfig(&path).expect("write kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("read kubeconfig");
    let _ = std::fs::remove_file(&path);
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig is valid");
    assert_eq!(
        config.cluster_url.to_string().trim_end_matches('/'),
        server.url()
    );
    Client::try_from(config).expect("client")
}

/// A ClusterIP Service in `default` with the given labels.
pub fn service(name: &str, labels: &[(&str, &str)]) -> Service {
    service_in("default", name, labels)
}

/// A ClusterIP Service with the given labels.
pub fn service_in(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: (!labels.is_empty()).then(|| {
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>()
            }),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.0.10".into()),
            ports: Some(vec![ServicePort {
                port: 80,
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// An EndpointSlice of Service `service` with one ready endpoint.
pub fn endpoint_slice(name: &str, service: &str, ip: &str) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                service.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(vec![Endpoint {
            addresses: vec![ip.into()],
            ..Endpoint::default()
        }]),
        ports: Some(vec![EndpointPort {
            port: Some(80),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    }
}

/// A short description of a watcher event, e.g. `InitApply(web)`.
pub fn describe<K: ResourceExt>(event: &watcher::Event<K>) -> String {
    match event {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitApply(o) => format!("InitApply({})", o.name_any()),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::Apply(o) => format!("Apply({})", o.name_any()),
        watcher::Event::Delete(o) => format!("Delete({})", o.name_any()),
    }
}

/// A watcher stream driven by its own task (as in the agent), so that it keeps watching
/// while the test is not reading: its items are forwarded through a channel.
pub struct Events<K> {
    rx: mpsc::UnboundedReceiver<watcher::Result<watcher::Event<K>>>,
    task: JoinHandle<()>,
}

impl<K> Drop for Events<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Drives `stream` on a task.
pub fn spawn<K, S>(stream: S) -> Events<K>
where
    S: Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    K: Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if tx.send(item).is_err() {
                return;
            }
        }
    });
    Events { rx, task }
}

impl<K: Debug + ResourceExt> Events<K> {
    /// The next item, failing the test after [`STEP`].
    pub async fn next(&mut self) -> watcher::Result<watcher::Event<K>> {
        tokio::time::timeout(STEP, self.rx.recv())
            .await
            .expect("timed out waiting for the next watcher event")
            .expect("the watcher stream never ends")
    }

    /// The next item if one comes within `d`.
    pub async fn next_within(&mut self, d: Duration) -> Option<watcher::Result<watcher::Event<K>>> {
        tokio::time::timeout(d, self.rx.recv()).await.ok().flatten()
    }

    /// The next successful event, collecting the errors skipped on the way.
    pub async fn next_ok(&mut self, errors: &mut Vec<String>) -> watcher::Event<K> {
        loop {
            match self.next().await {
                Ok(event) => return event,
                Err(e) => errors.push(e.to_string()),
            }
        }
    }

    /// The next `n` successful events, described.
    pub async fn take_ok(&mut self, n: usize, errors: &mut Vec<String>) -> Vec<String> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(describe(&self.next_ok(errors).await));
        }
        out
    }
}

/// Waits until `cond` holds, polling every 10 ms, failing after [`STEP`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
