//! The repository's aggregate cache: decided-on state kept in memory between commands.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::{instruments, Aggregate};

/// Counters of a [`Repository`](crate::Repository)'s aggregate cache, from
/// [`Repository::cache_stats`](crate::Repository::cache_stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Command attempts that appended from a cached aggregate, without a load.
    pub hits: u64,
    /// Command attempts that loaded the aggregate from the store: not cached, or cached
    /// but rejected or a no-op there (decided again on the stored aggregate).
    pub misses: u64,
    /// Cached aggregates found stale by the store's version check (another writer had
    /// appended); each costs one reload and retry.
    pub stale: u64,
    /// Aggregates dropped to stay within the capacity.
    pub evicted: u64,
    /// Aggregates in the cache now.
    pub entries: usize,
}

/// The key of one cached aggregate: its Rust type and the `Display` form of its id.
type Key = (TypeId, String);

struct Entry {
    aggregate: Box<dyn Any + Send + Sync>,
    version: u64,
    /// The tick of the last `put`; the smallest ticks are evicted first.
    used: u64,
}

#[derive(Default)]
struct Entries {
    map: HashMap<Key, Entry>,
    tick: u64,
}

/// Aggregates with their versions, bounded to `capacity` entries (least recently stored
/// out first). An aggregate is taken out for the duration of a command, so a concurrent
/// command on the same aggregate in this process loads it from the store instead of
/// sharing it; the store's version check orders the two.
pub(crate) struct AggregateCache {
    capacity: usize,
    entries: Mutex<Entries>,
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
    evicted: AtomicU64,
}

impl std::fmt::Debug for AggregateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateCache")
            .field("capacity", &self.capacity)
            .field("stats", &self.stats())
            .finish()
    }
}

impl AggregateCache {
    pub(crate) fn new(capacity: usize) -> Self {
        AggregateCache {
            capacity: capacity.max(1),
            entries: Mutex::new(Entries::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // The map holds no invariant a panicking holder could break half-way (every
        // critical section is one map operation), so a poisoned lock is still usable.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the aggregate `id` out of the cache, with its version.
    pub(crate) fn take<A: Aggregate>(&self, id: &A::Id) -> Option<(A, u64)> {
        let key = (TypeId::of::<A>(), id.to_string());
        let entry = self.lock().map.remove(&key);
        entry.and_then(|entry| {
            let version = entry.version;
            entry
                .aggregate
                .downcast::<A>()
                .ok()
                .map(|aggregate| (*aggregate, version))
        })
    }

    /// Counts an attempt that appended from the cache, without a load (also as
    /// `thalo_cache_hits_total`).
    pub(crate) fn record_hit(&self, aggregate_type: &'static str) {
        self.hits.fetch_add(1, Ordering::Relaxed);
        instruments::cache_hit(aggregate_type);
    }

    /// Stores `aggregate` at `version`, unless the cache already holds it at a later
    /// version (stored meanwhile by a concurrent command).
    pub(crate) fn put<A: Aggregate>(&self, id: &A::Id, aggregate: A, version: u64) {
        let key = (TypeId::of::<A>(), id.to_string());
        let mut entries = self.lock();
        entries.tick += 1;
        let used = entries.tick;
        if let Some(existing) = entries.map.get(&key) {
            if existing.version > version {
                return;
            }
        }
        entries.map.insert(
            key,
            Entry {
                aggregate: Box::new(aggregate),
                version,
                used,
            },
        );
        if entries.map.len() > self.capacity {
            let evicted = evict_oldest(&mut entries.map, self.capacity);
            self.evicted.fetch_add(evicted as u64, Ordering::Relaxed);
        }
    }

    /// Counts an attempt that loads the aggregate from the store (also as
    /// `thalo_cache_misses_total`).
    pub(crate) fn record_miss(&self, aggregate_type: &'static str) {
        self.misses.fetch_add(1, Ordering::Relaxed);
        instruments::cache_miss(aggregate_type);
    }

    /// Counts a cached aggregate the store found stale.
    pub(crate) fn record_stale(&self) {
        self.stale.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            stale: self.stale.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            entries: self.lock().map.len(),
        }
    }

    /// Drops every cached aggregate.
    pub(crate) fn clear(&self) {
        self.lock().map.clear();
    }
}

/// Evicts the least recently stored eighth of `capacity` (at least one entry, and at
/// least down to `capacity`), so the O(n) scan is paid once per `capacity / 8` inserts.
/// Returns how many entries were dropped.
fn evict_oldest(map: &mut HashMap<Key, Entry>, capacity: usize) -> usize {
    let target = capacity - capacity / 8;
    let excess = map.len().saturating_sub(target).max(1);
    let mut ticks: Vec<u64> = map.values().map(|entry| entry.used).collect();
    // Ticks are unique, so exactly `excess` entries are at or below the threshold.
    let (_, threshold, _) = ticks.select_nth_unstable(excess - 1);
    let threshold = *threshold;
    let before = map.len();
    map.retain(|_, entry| entry.used > threshold);
    before - map.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AggregateType, Error, Event};

    #[derive(Clone, Debug, PartialEq)]
    struct Noted;

    impl Event for Noted {
        fn event_type(&self) -> &'static str {
            "Noted"
        }
        fn encode(&self) -> Result<String, Error> {
            Ok("{}".into())
        }
        fn decode(_: &str, _: u16, _: &str) -> Result<Self, Error> {
            Ok(Noted)
        }
        fn event_types() -> &'static [&'static str] {
            &["Noted"]
        }
    }

    #[derive(Debug, PartialEq)]
    struct Note {
        id: u32,
        count: u32,
    }

    impl AggregateType for Note {
        const TYPE: &'static str = "note";
    }

    impl Aggregate for Note {
        type Id = u32;
        type Command = ();
        type Event = Noted;
        type Error = Error;
        fn new(id: u32) -> Self {
            Note { id, count: 0 }
        }
        fn id(&self) -> &u32 {
            &self.id
        }
        fn handle(&self, (): ()) -> Result<Vec<Noted>, Error> {
            Ok(vec![Noted])
        }
        fn apply(&mut self, _: Noted) {
            self.count += 1;
        }
    }

    #[test]
    fn take_removes() {
        let cache = AggregateCache::new(4);
        assert!(cache.take::<Note>(&1).is_none());
        cache.put(&1, Note { id: 1, count: 3 }, 3);
        assert_eq!(cache.stats().entries, 1);
        assert_eq!(cache.take::<Note>(&1), Some((Note { id: 1, count: 3 }, 3)));
        assert!(cache.take::<Note>(&1).is_none(), "taken out, not copied");
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn put_keeps_a_later_version() {
        let cache = AggregateCache::new(4);
        cache.put(&1, Note { id: 1, count: 5 }, 5);
        cache.put(&1, Note { id: 1, count: 4 }, 4);
        assert_eq!(cache.take::<Note>(&1).map(|(_, v)| v), Some(5));
    }

    #[test]
    fn evicts_least_recently_stored_within_capacity() {
        let cache = AggregateCache::new(16);
        for id in 0..16 {
            cache.put(&id, Note::new(id), 1);
        }
        // Refresh the oldest two, so they survive the next eviction.
        for id in 0..2 {
            let (note, version) = cache.take::<Note>(&id).unwrap();
            cache.put(&id, note, version);
        }
        cache.put(&16, Note::new(16), 1);
        let stats = cache.stats();
        assert!(stats.entries <= 16, "{stats:?}");
        assert_eq!(stats.evicted as usize, 17 - stats.entries);
        for id in [0, 1, 16] {
            assert!(cache.take::<Note>(&id).is_some(), "{id} was used recently");
        }
        assert!(cache.take::<Note>(&2).is_none(), "2 was the oldest");
    }
}
