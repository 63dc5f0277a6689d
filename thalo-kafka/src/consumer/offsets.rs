//! Offset continuity: every message of a partition is handed on exactly in offset
//! order, even from a broker that skips offsets when a fetch starts in the middle of
//! a record batch.
//!
//! A fetch from offset `n` must return the record batch that contains `n` (the client
//! drops the records before `n`); Kafka and Redpanda do. Some brokers (tansu 0.6) return
//! the *next* batch instead, so a consumer that starts from a committed offset in the
//! middle of a batch, or resumes a paused partition, would silently skip the rest of
//! that batch. The consumer therefore tracks the next offset it expects per partition.
//! When a message comes from beyond it, the consumer drops it and re-fetches from
//! further back (1, 2, 4, ... offsets before the expected one) until the expected
//! offset arrives, dropping what it has seen already. Offsets that do not exist
//! (compacted away, transaction markers) are recognised: the re-fetch then delivers
//! messages before the expected offset and, next, one after it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How many batch starts a partition remembers.
const KNOWN_STARTS: usize = 32;

/// How far below the expected offset a remembered batch start may be to be tried.
const NEAR_START: i64 = 2048;

/// How long a partition with messages left (below its high watermark) may deliver
/// nothing before the consumer fetches it again from further back: a broker that skips
/// to the next batch returns nothing at all when the skipped batch was the last one.
pub(crate) const STALL: Duration = Duration::from_secs(1);

/// The furthest a re-fetch goes back before the consumer accepts the gap.
const MAX_BACK: i64 = 1 << 20;

/// What to do with a received message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The next message of its partition: hand it on.
    Deliver,
    /// Seen already (a re-fetch starts before the expected offset): drop it.
    Drop,
    /// The broker skipped offsets: drop it and re-fetch the partition from `from`.
    Refetch { from: i64 },
}

#[derive(Debug, Default)]
struct Partition {
    /// The next offset to hand on; `None` until the first message (no committed offset:
    /// the partition starts where `auto.offset.reset` says).
    expected: Option<i64>,
    /// How far the next re-fetch goes back.
    back: i64,
    /// A re-fetch is under way.
    refetching: bool,
    /// The re-fetch delivered messages before the expected offset.
    saw_below: bool,
    /// When the partition last delivered a message or was last re-fetched.
    active_at: Option<Instant>,
    /// The next message is the first of a fetch that started afresh: a batch start.
    fresh_fetch: bool,
    /// Offsets where fetches started (batch starts, on a broker that answers with whole
    /// batches): a re-fetch tries the latest one before the expected offset first.
    starts: VecDeque<i64>,
    /// This re-fetch already tried a known batch start.
    tried_start: bool,
}

/// The offsets of the partitions a consumer holds.
#[derive(Debug, Default)]
pub(crate) struct Continuity {
    partitions: HashMap<(String, i32), Partition>,
}

impl Continuity {
    /// A partition was (re)assigned and starts at `committed` (if any).
    pub(crate) fn start(&mut self, key: (String, i32), committed: Option<i64>) {
        self.partitions.insert(
            key,
            Partition {
                expected: committed,
                back: 1,
                active_at: Some(Instant::now()),
                fresh_fetch: true,
                ..Partition::default()
            },
        );
    }

    /// Decides about a message at `offset` of partition `key`.
    pub(crate) fn check(&mut self, key: &(String, i32), offset: i64) -> Verdict {
        let partition = self.partitions.entry(key.clone()).or_insert(Partition {
            back: 1,
            ..Partition::default()
        });
        partition.active_at = Some(Instant::now());
        if partition.fresh_fetch {
            partition.fresh_fetch = false;
            if partition.starts.len() == KNOWN_STARTS {
                partition.starts.pop_front();
            }
            partition.starts.push_back(offset);
        }
        let Some(expected) = partition.expected else {
            partition.expected = Some(offset + 1);
            return Verdict::Deliver;
        };
        if offset < expected {
            if partition.refetching {
                partition.saw_below = true;
            }
            return Verdict::Drop;
        }
        let accept = offset == expected
            // The re-fetch went past the expected offset after messages before it: the
            // offsets in between do not exist.
            || (partition.refetching && partition.saw_below)
            || partition.back > MAX_BACK
            || expected == 0;
        if accept {
            partition.expected = Some(offset + 1);
            partition.back = 1;
            partition.refetching = false;
            partition.saw_below = false;
            partition.tried_start = false;
            return Verdict::Deliver;
        }
        Verdict::Refetch {
            from: partition.refetch_from(expected),
        }
    }

    /// Whether partition `key`, whose high watermark is `high`, has delivered nothing
    /// for [`STALL`] although messages are left: then the offset to fetch it again from.
    pub(crate) fn stalled(&mut self, key: &(String, i32), high: i64, now: Instant) -> Option<i64> {
        let partition = self.partitions.get_mut(key)?;
        let expected = partition.expected?;
        let quiet = partition
            .active_at
            .is_none_or(|at| now.duration_since(at) >= STALL);
        if expected >= high || !quiet || partition.back > MAX_BACK {
            return None;
        }
        partition.active_at = Some(now);
        Some(partition.refetch_from(expected))
    }

    /// Forgets partitions that are no longer held.
    pub(crate) fn retain(&mut self, mut held: impl FnMut(&(String, i32)) -> bool) {
        self.partitions.retain(|key, _| held(key));
    }

    /// The partitions being tracked.
    pub(crate) fn keys(&self) -> Vec<(String, i32)> {
        self.partitions.keys().cloned().collect()
    }
}

impl Partition {
    /// Starts (or widens) a re-fetch before `expected`: from the latest known batch
    /// start first, then 1, 2, 4, ... offsets back.
    fn refetch_from(&mut self, expected: i64) -> i64 {
        self.refetching = true;
        self.saw_below = false;
        self.fresh_fetch = true;
        // Only a start close below the expected offset: the batch around it is the one
        // to fetch again, and a far older start would re-read a long stretch.
        let known = self
            .starts
            .iter()
            .copied()
            .filter(|s| *s < expected && expected - *s <= NEAR_START)
            .max();
        if let (Some(start), false) = (known, self.tried_start) {
            self.tried_start = true;
            return start;
        }
        let from = (expected - self.back).max(0);
        self.back = self.back.saturating_mul(2);
        from
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> (String, i32) {
        ("t".to_owned(), 0)
    }

    #[test]
    fn in_order_messages_are_delivered() {
        let mut c = Continuity::default();
        c.start(key(), Some(5));
        assert_eq!(c.check(&key(), 5), Verdict::Deliver);
        assert_eq!(c.check(&key(), 6), Verdict::Deliver);
        assert_eq!(c.check(&key(), 6), Verdict::Drop);
    }

    #[test]
    fn a_skip_is_refetched_from_further_back_until_the_expected_offset_comes() {
        // Batches [0..20), [20..40) and [40..60); committed offset 25; the broker
        // answers a fetch from the middle of a batch with the next batch.
        let mut c = Continuity::default();
        c.start(key(), Some(25));
        assert_eq!(c.check(&key(), 40), Verdict::Refetch { from: 24 });
        assert_eq!(c.check(&key(), 40), Verdict::Refetch { from: 23 });
        assert_eq!(c.check(&key(), 40), Verdict::Refetch { from: 21 });
        assert_eq!(c.check(&key(), 40), Verdict::Refetch { from: 17 });
        for offset in 20..25 {
            assert_eq!(c.check(&key(), offset), Verdict::Drop);
        }
        assert_eq!(c.check(&key(), 25), Verdict::Deliver);
        assert_eq!(c.check(&key(), 26), Verdict::Deliver);
        // Paused and resumed at 27: the broker skips to 40 again; the batch start it
        // learnt (20) is tried first.
        assert_eq!(c.check(&key(), 27), Verdict::Deliver);
        assert_eq!(c.check(&key(), 40), Verdict::Refetch { from: 20 });
        for offset in 20..28 {
            assert_eq!(c.check(&key(), offset), Verdict::Drop);
        }
        assert_eq!(c.check(&key(), 28), Verdict::Deliver);
    }

    #[test]
    fn offsets_that_do_not_exist_are_accepted_after_a_refetch() {
        let mut c = Continuity::default();
        c.start(key(), Some(10));
        assert_eq!(c.check(&key(), 12), Verdict::Refetch { from: 9 });
        assert_eq!(c.check(&key(), 9), Verdict::Drop);
        assert_eq!(c.check(&key(), 12), Verdict::Deliver);
        assert_eq!(c.check(&key(), 13), Verdict::Deliver);
    }

    #[test]
    fn a_silent_partition_with_messages_left_is_fetched_again() {
        let mut c = Continuity::default();
        c.start(key(), Some(5));
        let now = Instant::now();
        assert_eq!(c.stalled(&key(), 20, now), None, "not quiet long enough");
        let later = now + STALL;
        assert_eq!(c.stalled(&key(), 5, later), None, "nothing left");
        assert_eq!(c.stalled(&key(), 20, later), Some(4));
        assert_eq!(c.stalled(&key(), 20, later), None, "just re-fetched");
        assert_eq!(c.stalled(&key(), 20, later + STALL), Some(3));
        for offset in 3..5 {
            assert_eq!(c.check(&key(), offset), Verdict::Drop);
        }
        assert_eq!(c.check(&key(), 5), Verdict::Deliver);
        // The re-fetch started at 3: a re-fetch before 9 tries there first.
        for offset in 6..9 {
            assert_eq!(c.check(&key(), offset), Verdict::Deliver);
        }
        let much_later = later + STALL * 3;
        assert_eq!(c.stalled(&key(), 20, much_later), Some(3));
    }

    #[test]
    fn without_a_committed_offset_the_first_message_starts_the_partition() {
        let mut c = Continuity::default();
        c.start(key(), None);
        assert_eq!(c.check(&key(), 7), Verdict::Deliver);
        assert_eq!(c.check(&key(), 8), Verdict::Deliver);
    }
}
