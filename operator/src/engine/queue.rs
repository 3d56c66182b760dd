//! The dispatcher's pure core: the per-model priority queue of ready tasks, the choice of a
//! worker endpoint for the next attempt, and the replica count the autoscaler asks for.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

use k8s_openapi::jiff::Timestamp;

use crate::api::model::ReplicaPolicy;

/// One queued task as handed out by [`ModelQueue::pop_ready`].
#[derive(Clone, Debug, PartialEq)]
pub struct QueueEntry<T> {
    /// Task key (`namespace/name`).
    pub key: String,
    /// Higher runs first.
    pub priority: i32,
    /// Not handed out before this time (retry backoff).
    pub not_before: Option<Timestamp>,
    /// What the dispatcher needs to run the attempt.
    pub payload: T,
}

#[derive(Debug)]
struct Slot<T> {
    entry: QueueEntry<T>,
    seq: u64,
    /// Whether the entry sits in `delayed` (true) or `ready` (false).
    delayed: bool,
}

/// Tasks of one model waiting for a worker: highest priority first, then first in, first out.
/// Entries whose `not_before` lies in the future wait in a separate time-ordered index until
/// they are due. Every operation is O(log n) (amortised for `pop_ready`).
#[derive(Debug)]
pub struct ModelQueue<T> {
    slots: HashMap<String, Slot<T>>,
    ready: BTreeMap<(Reverse<i32>, u64), String>,
    delayed: BTreeMap<(Timestamp, u64), String>,
    next_seq: u64,
}

impl<T> Default for ModelQueue<T> {
    fn default() -> Self {
        ModelQueue {
            slots: HashMap::new(),
            ready: BTreeMap::new(),
            delayed: BTreeMap::new(),
            next_seq: 0,
        }
    }
}

impl<T> ModelQueue<T> {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry, replacing (and sending to the back of its priority) any entry with the
    /// same key, so a task is never queued twice.
    pub fn push(&mut self, key: impl Into<String>, priority: i32, not_before: Option<Timestamp>, payload: T) {
        let key = key.into();
        self.remove(&key);
        let seq = self.next_seq;
        self.next_seq += 1;
        let delayed = not_before.is_some();
        match not_before {
            Some(t) => self.delayed.insert((t, seq), key.clone()),
            None => self.ready.insert((Reverse(priority), seq), key.clone()),
        };
        let entry = QueueEntry {
            key: key.clone(),
            priority,
            not_before,
            payload,
        };
        self.slots.insert(key, Slot { entry, seq, delayed });
    }

    /// Removes and returns the entry for `key`, if queued.
    pub fn remove(&mut self, key: &str) -> Option<QueueEntry<T>> {
        let slot = self.slots.remove(key)?;
        if slot.delayed {
            if let Some(t) = slot.entry.not_before {
                self.delayed.remove(&(t, slot.seq));
            }
        } else {
            self.ready.remove(&(Reverse(slot.entry.priority), slot.seq));
        }
        Some(slot.entry)
    }

    /// Whether `key` is queued.
    pub fn contains(&self, key: &str) -> bool {
        self.slots.contains_key(key)
    }

    /// Number of queued entries, due or not.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Moves entries that are due at `now` from the delayed index into the ready one.
    fn promote(&mut self, now: Timestamp) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            if let Some(slot) = self.slots.get_mut(&key) {
                slot.delayed = false;
                self.ready.insert((Reverse(slot.entry.priority), slot.seq), key);
            }
        }
    }

    /// Takes the highest-priority, oldest entry that is due at `now`.
    pub fn pop_ready(&mut self, now: Timestamp) -> Option<QueueEntry<T>> {
        self.promote(now);
        let (_, key) = self.ready.pop_first()?;
        self.slots.remove(&key).map(|slot| slot.entry)
    }

    /// When the next entry becomes due: `now` if one is due already, the earliest `not_before`
    /// otherwise, `None` when the queue is empty.
    pub fn next_ready_time(&self, now: Timestamp) -> Option<Timestamp> {
        if !self.ready.is_empty() {
            return Some(now);
        }
        self.delayed.keys().next().map(|(t, _)| (*t).max(now))
    }
}

/// Worker endpoints of one model and what each has in flight.
#[derive(Clone, Debug)]
pub struct Endpoints {
    limit: u32,
    in_flight: BTreeMap<String, u32>,
}

impl Endpoints {
    /// No endpoints yet; each will take at most `limit` attempts at once (at least 1).
    pub fn new(limit: u32) -> Self {
        Endpoints {
            limit: limit.max(1),
            in_flight: BTreeMap::new(),
        }
    }

    /// Changes the per-endpoint limit (from `maxInFlightPerReplica`).
    pub fn set_limit(&mut self, limit: u32) {
        self.limit = limit.max(1);
    }

    /// Replaces the ready endpoints. Surviving endpoints keep their in-flight counts; attempts
    /// on vanished ones are forgotten (their release is then a no-op).
    pub fn set_ready<I, S>(&mut self, addresses: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let old = std::mem::take(&mut self.in_flight);
        for address in addresses {
            let address = address.into();
            let count = old.get(&address).copied().unwrap_or(0);
            self.in_flight.insert(address, count);
        }
    }

    /// Picks the ready endpoint with the fewest attempts in flight (below the limit) and counts
    /// one more attempt on it. Ties go to the lowest address, so the choice is deterministic.
    pub fn acquire(&mut self) -> Option<String> {
        let (address, count) = self
            .in_flight
            .iter_mut()
            .filter(|(_, n)| **n < self.limit)
            .min_by_key(|(_, n)| **n)?;
        *count += 1;
        Some(address.clone())
    }

    /// Ends one attempt on `address`.
    pub fn release(&mut self, address: &str) {
        if let Some(count) = self.in_flight.get_mut(address) {
            *count = count.saturating_sub(1);
        }
    }

    /// How many more attempts the ready endpoints can take.
    pub fn capacity_left(&self) -> u32 {
        self.in_flight
            .values()
            .map(|n| self.limit.saturating_sub(*n))
            .fold(0u32, u32::saturating_add)
    }

    /// Attempts in flight on ready endpoints.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.values().fold(0u32, |a, n| a.saturating_add(*n))
    }

    /// Number of ready endpoints.
    pub fn ready(&self) -> usize {
        self.in_flight.len()
    }
}

/// The replica count to ask for: `ceil((queued + in_flight) / targetQueueDepthPerReplica)`
/// clamped to `[min, max]`, at least 1 while any task waits (scale from zero). Scaling up and
/// moving back into `[min, max]` happen at once; scaling down waits until
/// `scaleDownDelaySeconds` have passed since `last_scale`, so a brief lull does not kill
/// replicas that are about to be needed again.
pub fn desired_replicas(
    policy: &ReplicaPolicy,
    queued: u32,
    in_flight: u32,
    current: i32,
    last_scale: Option<Timestamp>,
    now: Timestamp,
) -> i32 {
    let load = u64::from(queued) + u64::from(in_flight);
    let per_replica = u64::from(policy.target_queue_depth_per_replica.max(1));
    let wanted = i32::try_from(load.div_ceil(per_replica)).unwrap_or(i32::MAX);
    let (min, max) = (policy.min.max(0), policy.max.max(0));
    let mut target = wanted.clamp(min, max.max(min));
    if load > 0 && max >= 1 {
        target = target.max(1);
    }
    // Above max (max was lowered): drop to max at once, then scale down as usual.
    let current = current.min(max.max(min));
    if target >= current {
        return target;
    }
    let delay = std::time::Duration::from_secs(u64::from(policy.scale_down_delay_seconds));
    let due = last_scale.map(|t| t.saturating_add(delay).unwrap_or(Timestamp::MAX));
    match due {
        Some(due) if now < due => current,
        _ => target,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn priority_then_fifo() {
        let mut q = ModelQueue::new();
        q.push("a", 0, None, 1);
        q.push("b", 5, None, 2);
        q.push("c", 0, None, 3);
        q.push("d", 5, None, 4);
        assert_eq!(q.len(), 4);
        let order: Vec<_> = std::iter::from_fn(|| q.pop_ready(ts(0)).map(|e| e.key)).collect();
        assert_eq!(order, vec!["b", "d", "a", "c"]);
        assert!(q.is_empty());
    }

    #[test]
    fn push_replaces_and_remove_works() {
        let mut q = ModelQueue::new();
        q.push("a", 0, None, 1);
        q.push("b", 0, None, 2);
        q.push("a", 0, None, 3);
        assert_eq!(q.len(), 2);
        let e = q.pop_ready(ts(0)).unwrap();
        assert_eq!((e.key.as_str(), e.payload), ("b", 2));
        assert_eq!(q.pop_ready(ts(0)).unwrap().payload, 3);
        q.push("x", 0, Some(ts(10)), 0);
        q.push("y", 0, None, 0);
        assert!(q.remove("x").is_some());
        assert!(q.remove("x").is_none());
        assert!(q.remove("y").is_some());
        assert!(q.is_empty());
        assert_eq!(q.next_ready_time(ts(0)), None);
    }

    #[test]
    fn delayed_entries_wait() {
        let mut q = ModelQueue::new();
        q.push("late", 10, Some(ts(100)), ());
        q.push("early", 10, Some(ts(50)), ());
        assert_eq!(q.next_ready_time(ts(0)), Some(ts(50)));
        assert!(q.pop_ready(ts(49)).is_none());
        q.push("now", 0, None, ());
        assert_eq!(q.next_ready_time(ts(0)), Some(ts(0)));
        assert_eq!(q.pop_ready(ts(49)).unwrap().key, "now");
        assert_eq!(q.pop_ready(ts(50)).unwrap().key, "early");
        assert!(q.pop_ready(ts(99)).is_none());
        assert_eq!(q.pop_ready(ts(100)).unwrap().key, "late");
        // A delayed entry replaced by an immediate one is not handed out twice.
        q.push("a", 0, Some(ts(5)), ());
        q.push("a", 0, None, ());
        assert_eq!(q.pop_ready(ts(10)).unwrap().key, "a");
        assert!(q.pop_ready(ts(10)).is_none());
    }

    #[test]
    fn many_entries() {
        let mut q = ModelQueue::new();
        for i in 0..10_000 {
            q.push(
                format!("t{i}"),
                i % 7,
                if i % 3 == 0 { Some(ts(i.into())) } else { None },
                i,
            );
        }
        let mut last = (i32::MAX, 0);
        let mut n = 0;
        while let Some(e) = q.pop_ready(ts(-1)) {
            assert!(e.priority <= last.0);
            if e.priority == last.0 {
                assert!(e.payload > last.1);
            }
            last = (e.priority, e.payload);
            n += 1;
        }
        assert_eq!(n, 10_000 - 3334);
        assert_eq!(q.len(), 3334);
    }

    #[test]
    fn endpoints_balance_and_limit() {
        let mut e = Endpoints::new(2);
        assert_eq!(e.acquire(), None);
        e.set_ready(["a", "b"]);
        assert_eq!(e.capacity_left(), 4);
        assert_eq!(e.acquire().as_deref(), Some("a"));
        assert_eq!(e.acquire().as_deref(), Some("b"));
        assert_eq!(e.acquire().as_deref(), Some("a"));
        assert_eq!(e.acquire().as_deref(), Some("b"));
        assert_eq!(e.acquire(), None);
        assert_eq!(e.capacity_left(), 0);
        e.release("a");
        assert_eq!(e.acquire().as_deref(), Some("a"));
        e.set_ready(["b", "c"]);
        assert_eq!(e.in_flight(), 2);
        assert_eq!(e.capacity_left(), 2);
        assert_eq!(e.acquire().as_deref(), Some("c"));
        e.release("gone");
        e.release("b");
        e.release("b");
        e.release("b");
        assert_eq!(e.in_flight(), 1);
        assert_eq!(e.ready(), 2);
    }

    fn policy(min: i32, max: i32, depth: u32, delay: u32) -> ReplicaPolicy {
        ReplicaPolicy {
            min,
            max,
            target_queue_depth_per_replica: depth,
            max_in_flight_per_replica: 8,
            scale_down_delay_seconds: delay,
        }
    }

    #[test]
    fn scaling() {
        let p = policy(0, 5, 10, 300);
        let now = ts(1000);
        assert_eq!(desired_replicas(&p, 0, 0, 0, None, now), 0);
        assert_eq!(desired_replicas(&p, 1, 0, 0, None, now), 1, "scale from zero");
        assert_eq!(desired_replicas(&p, 15, 6, 1, Some(now), now), 3, "up at once");
        assert_eq!(desired_replicas(&p, 500, 0, 1, Some(now), now), 5, "capped");
        assert_eq!(desired_replicas(&p, 0, 0, 3, Some(ts(900)), now), 3, "down waits");
        assert_eq!(
            desired_replicas(&p, 0, 0, 3, Some(ts(700)), now),
            0,
            "down after delay"
        );
        assert_eq!(desired_replicas(&p, 0, 0, 3, None, now), 0);
        assert_eq!(
            desired_replicas(&p, 0, 0, 9, Some(now), now),
            5,
            "back into bounds"
        );
        assert_eq!(desired_replicas(&p, 0, 0, 9, None, now), 0);
        let p = policy(2, 4, 10, 300);
        assert_eq!(desired_replicas(&p, 0, 0, 0, None, now), 2, "min holds");
        let p = policy(0, 3, 0, 0);
        assert_eq!(desired_replicas(&p, u32::MAX, u32::MAX, 0, None, now), 3);
        let p = policy(0, 0, 10, 0);
        assert_eq!(desired_replicas(&p, 5, 0, 0, None, now), 0, "max 0 stays 0");
    }
}
