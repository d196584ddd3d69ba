//! Where the Kubernetes objects come from. Every source produces the same
//! [`ClusterObjects`](crate::translate::ClusterObjects) for the one translation and writer.
pub mod kube;
pub mod manifests;
