//! Encoded UDP answers from the index, by the exact bytes of the query after its id.
//!
//! An answer from the [`DnsIndex`](super::index::DnsIndex) is a function of the query's
//! bytes and of the index, nothing else (not the client's address, not the time): the same
//! bytes under the same index [generation](super::index::DnsIndex::generation) get the same
//! answer but for the 2-byte message id, which a hit copies from the query. So a hit skips
//! decoding, resolving and encoding, and stays exact whatever the query holds (case of the
//! name, flags, EDNS buffer size, options): a query that differs in any byte is a miss,
//! answered and encoded by hickory as before. An entry of another generation is never
//! served: any change of the index makes every entry a miss.
//!
//! Bounded: a shard that is full is emptied (the names asked again fill it again), so a
//! client asking endless distinct names costs a bounded amount of memory.
use std::{
    hash::BuildHasher as _,
    sync::{Mutex, PoisonError},
};

use hashbrown::{DefaultHashBuilder, HashTable};

/// Shards, each behind its own lock, so the UDP threads seldom wait for each other.
const SHARDS: usize = 16;

/// Queries longer than this are not cached (a question with EDNS is far shorter).
const MAX_KEY: usize = 512;

/// The answers, by query.
pub struct AnswerCache {
    hasher: DefaultHashBuilder,
    shards: Box<[Mutex<Shard>]>,
    /// The bytes of keys and answers a shard holds at most.
    shard_bytes: usize,
}

#[derive(Default)]
struct Shard {
    entries: HashTable<Entry>,
    /// The bytes of the keys and answers held.
    bytes: usize,
}

struct Entry {
    /// The index generation the answer was encoded from.
    generation: u64,
    /// How many of `bytes` are the key (the query without its id).
    key_len: u16,
    /// The key, then the answer (with the id of the query it was made for).
    bytes: Box<[u8]>,
}

impl Entry {
    fn key(&self) -> &[u8] {
        &self.bytes[..usize::from(self.key_len)]
    }

    fn answer(&self) -> &[u8] {
        &self.bytes[usize::from(self.key_len)..]
    }
}

/// The part of a query its answer depends on: all but the id.
fn key(query: &[u8]) -> Option<&[u8]> {
    query.get(2..).filter(|k| k.len() <= MAX_KEY)
}

impl AnswerCache {
    /// A cache holding at most about `max_bytes` of queries and answers.
    #[must_use]
    pub fn new(max_bytes: usize) -> Self {
        Self {
            hasher: DefaultHashBuilder::default(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            shard_bytes: max_bytes / SHARDS,
        }
    }

    fn shard(&self, hash: u64) -> std::sync::MutexGuard<'_, Shard> {
        // The top bits pick the shard; the table uses the low ones.
        let at = (hash >> 58) as usize % SHARDS;
        self.shards[at]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the answer to `query` encoded from index `generation` into `out` (with the
    /// query's id); `false` when there is none.
    pub fn get(&self, query: &[u8], generation: u64, out: &mut Vec<u8>) -> bool {
        let Some(key) = key(query) else {
            return false;
        };
        let hash = self.hasher.hash_one(key);
        let shard = self.shard(hash);
        let Some(entry) = shard
            .entries
            .find(hash, |e| e.generation == generation && e.key() == key)
        else {
            return false;
        };
        out.clear();
        out.extend_from_slice(entry.answer());
        drop(shard);
        out[..2].copy_from_slice(&query[..2]);
        true
    }

    /// Keeps `answer`, encoded from index `generation`, for the queries with the bytes of
    /// `query` (but the id).
    pub fn insert(&self, query: &[u8], generation: u64, answer: &[u8]) {
        let Some(key) = key(query) else {
            return;
        };
        if answer.len() < 2 {
            return;
        }
        let Ok(key_len) = u16::try_from(key.len()) else {
            return;
        };
        let size = key.len() + answer.len();
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard(hash);
        let Shard { entries, bytes } = &mut *shard;
        match entries.find_mut(hash, |e| e.key() == key) {
            Some(entry) => {
                // The same query under an older generation: replaced.
                *bytes = *bytes - entry.bytes.len() + size;
                entry.generation = generation;
                entry.bytes = [key, answer].concat().into_boxed_slice();
            }
            None => {
                if *bytes + size > self.shard_bytes {
                    entries.clear();
                    *bytes = 0;
                    if size > self.shard_bytes {
                        return;
                    }
                }
                *bytes += size;
                let entry = Entry {
                    generation,
                    key_len,
                    bytes: [key, answer].concat().into_boxed_slice(),
                };
                entries.insert_unique(hash, entry, |e| self.hasher.hash_one(e.key()));
            }
        }
    }

    /// How many answers are held (of any generation).
    #[must_use]
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entries
                    .len()
            })
            .sum()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, rest: &[u8]) -> Vec<u8> {
        [&id.to_be_bytes()[..], rest].concat()
    }

    #[test]
    fn a_hit_is_the_answer_with_the_querys_id() {
        let cache = AnswerCache::new(1 << 20);
        cache.insert(&query(1, b"question"), 7, &query(1, b"answer"));
        let mut out = Vec::new();
        assert!(cache.get(&query(0xbeef, b"question"), 7, &mut out));
        assert_eq!(out, query(0xbeef, b"answer"));
        // Any other byte, or another generation of the index: no answer.
        assert!(!cache.get(&query(1, b"Question"), 7, &mut out));
        assert!(!cache.get(&query(1, b"question"), 8, &mut out));
        cache.insert(&query(1, b"question"), 8, &query(1, b"newer"));
        assert!(cache.get(&query(2, b"question"), 8, &mut out));
        assert_eq!(out, query(2, b"newer"));
        assert!(!cache.get(&query(2, b"question"), 7, &mut out));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_full_cache_starts_over_within_its_bound() {
        let cache = AnswerCache::new(SHARDS * 1000);
        for i in 0..10_000u32 {
            let q = query(0, &i.to_be_bytes());
            cache.insert(&q, 1, &query(0, &[0; 40]));
        }
        // 48 bytes an entry, at most 1,000 bytes a shard.
        assert!(cache.len() <= SHARDS * 1000 / 48, "{}", cache.len());
        assert!(cache.len() >= SHARDS, "{}", cache.len());
        let mut out = Vec::new();
        let last = query(9, &9_999u32.to_be_bytes());
        assert!(cache.get(&last, 1, &mut out));
    }
}
