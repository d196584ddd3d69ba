//! Where the Kubernetes objects come from. Every source emits the same
//! [`Change`](change::Change)s for the one [`Reconciler`](crate::reconcile::Reconciler).
pub mod api_guard;
pub mod change;
pub mod kube;
pub mod manifests;
