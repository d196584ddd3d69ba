//! Cluster DNS from the agent's own state: the Kubernetes DNS-based service discovery
//! specification answered from the same Services and endpoints that fill the maps, updated
//! in the same sync ([`index`]), by a server ([`server`]: hickory's handler and TCP, lb's
//! own UDP threads, [`udp`], with an answer [`cache`]) that forwards other names to the node's resolvers ([`forward`]).
pub mod answer;
pub mod cache;
pub mod forward;
pub mod index;
pub mod publish;
pub mod records;
pub mod server;
pub mod udp;
