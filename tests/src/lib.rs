//! Fixtures for the load balancer's privileged end-to-end tests, and the `lb-testkit` command.
//!
//! A test simulates one Kubernetes node on this machine:
//! - [`Topology`]: a node network namespace with a bridge (10.244.0.1/16, fd00:244::1/64) and one
//!   dual-stack namespace per pod, joined to the bridge by a veth, default routes via the bridge.
//!   Nothing leaves the machine.
//! - [`TestCgroup`]: the cgroup the agent attaches its programs to; clients run inside it.
//! - [`PinDir`]: the agent's bpffs pin directory.
//! - [`Manifests`] and the builders in [`manifests`]: the directory the agent watches.
//! - [`Agent`]: the `lb-agent` process under test, run in the node namespace, and what
//!   `lb-agent services` lists ([`Frontend`], [`Backend`]).
//! - [`TestEnv`]: all of the above for one test, in the right drop order.
//!
//! Every guard cleans up on drop (also while panicking), everything is named with the prefix
//! `lbt<pid>-<n>`, and [`cleanup_leftovers`] removes what a crashed earlier run left. Each test
//! starts with `if !require_privileges() { return; }`.

pub mod agent;
pub mod apiserver;
pub mod bins;
pub mod bpffs;
pub mod cgroup;
pub mod clock;
pub mod cmd;
pub mod env;
pub mod http;
pub mod leftovers;
pub mod manifests;
pub mod monitor;
pub mod mounts;
pub mod names;
pub mod netns;
pub mod pod_spec;
pub mod podman;
pub mod privileges;
pub mod testkit;
pub mod topology;

pub use agent::{Agent, Backend, Frontend};
pub use apiserver::ApiServer;
pub use bpffs::PinDir;
pub use cgroup::TestCgroup;
pub use env::{API_ADDR, BackendPod, DualStackBackend, Listen, TestEnv};
pub use leftovers::cleanup_leftovers;
pub use manifests::Manifests;
pub use netns::Netns;
pub use privileges::require_privileges;
pub use testkit::ClientSummary;
pub use topology::{
    Client, EXT_DEVICE, EXTERNAL_CLIENT_IP, EXTERNAL_CLIENT_IP6, NODE_EXT_IP, NODE_EXT_IP6,
    NODE_PEER_IP6, PEER_DEVICE, Pod, REMOTE_NODE_IP6, Server, Topology,
};
