//! A fake Kubernetes API server for the watch tests, listening inside the test's node
//! namespace (where the agent runs), so nothing of it is reachable from the host.
use std::{fs::File, os::fd::AsRawFd as _, path::Path, time::Duration};

use fake_apiserver::{FakeApiServer, ResourceKind};
use serde::Serialize;

/// The server and the runtime that drives it.
#[derive(Debug)]
pub struct ApiServer {
    server: Option<FakeApiServer>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ApiServer {
    /// Starts the server in network namespace `netns` (bookmarks every 200 ms).
    #[track_caller]
    pub fn start_in(netns: &str) -> Self {
        let path = Path::new("/run/netns").join(netns);
        let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        // setns is per thread, and the runtime's workers inherit it from the thread that
        // builds the runtime: do both on a thread of its own.
        let (runtime, server) = std::thread::spawn(move || {
            // SAFETY: a valid namespace fd; only this fresh thread changes namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("tokio runtime");
            let server = runtime
                .block_on(
                    FakeApiServer::builder()
                        .bookmark_interval(Duration::from_millis(200))
                        .start(),
                )
                .expect("starting the fake API server");
            (runtime, server)
        })
        .join()
        .expect("fake API server thread");
        Self {
            server: Some(server),
            runtime: Some(runtime),
        }
    }

    /// The server (its handle's methods are synchronous).
    pub fn api(&self) -> &FakeApiServer {
        self.server.as_ref().expect("running")
    }

    /// Writes a kubeconfig for the agent.
    #[track_caller]
    pub fn write_kubeconfig(&self, path: &Path) {
        self.api()
            .write_kubeconfig(path)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// Creates or updates an object (a k8s-openapi Service or EndpointSlice).
    #[track_caller]
    pub fn apply(&self, object: impl Serialize) {
        self.api().apply(object).expect("apply");
    }

    /// Deletes an object.
    pub fn delete(&self, kind: ResourceKind, namespace: &str, name: &str) {
        self.api().delete(kind, namespace, name);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Stop the server inside its runtime, then the runtime.
        if let (Some(server), Some(runtime)) = (self.server.take(), self.runtime.take()) {
            runtime.block_on(async move { drop(server) });
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}
