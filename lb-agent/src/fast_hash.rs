//! The hash maps of the agent's model and writer: std's maps with foldhash's hasher.
//!
//! A first sync of 100,000 Services × 10 endpoints hashes object names and addresses some
//! tens of millions of times; std's SipHash made that a tenth of the sync's CPU time.
//! foldhash is several times faster on these short keys and is still seeded at random per
//! process, so a client cannot choose names that collide (the keys come from the API
//! server, which any namespace's user can write to).
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
