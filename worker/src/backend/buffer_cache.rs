//! Reuse of freed device buffers, apart from the device so that it is tested without a GPU: the
//! CUDA backend (`backend/cuda/tensor.rs`) hands every buffer an op drops back here and takes
//! the next op's output from here, so a forward pass whose shapes have been seen before (every
//! decode step after the first, every encoder batch after the warm-up pass at load) asks the
//! driver for no memory at all.
//!
//! The rules:
//! - requests are rounded up to a size class ([`size_class`]: eight classes per doubling, so at
//!   most 12.5% more than asked for) and served only by an idle buffer of exactly that class.
//!   That makes a repeated pass free of misses: the buffers of a class a pass holds at once are
//!   never more than the buffers of that class its first run left behind. (Letting a request
//!   take any larger idle buffer would not: it can take the one a later request needs.)
//! - among idle buffers of a class the one given back last is taken first;
//! - a buffer whose size is not a class (one allocated at its exact size, such as a weight
//!   uploaded at load) is not kept when given back;
//! - idle buffers hold at most `limit` bytes: giving one back beyond that evicts the buffers
//!   given back longest ago (a buffer larger than the limit is not kept), and the caller frees
//!   what is evicted;
//! - [`BufferCache::drain`] evicts everything (what the caller does before asking the driver
//!   again after it ran out of memory).
//!
//! Buffers are taken and given back in the order the host queues work on the device's one
//! stream, so a buffer given back after the kernels that read it were queued is free for any
//! kernel queued later: no event or synchronisation is needed.

use std::collections::{BTreeMap, VecDeque};

/// Idle device memory a backend keeps by default (the worker's `--gpu-buffer-cache-mib`):
/// several times the activations of a BERT-base batch of 32 × 128 or of a 1B decoder's prompt
/// of a few thousand tokens, and little beside a GPU's memory.
pub const DEFAULT_LIMIT_BYTES: usize = 2 << 30;

/// The smallest size class, and the granule of the classes up to 4 KiB.
pub const MIN_CLASS: usize = 512;

/// The size class of a request of `bytes`: `bytes` rounded up to a multiple of an eighth of the
/// largest power of two not above it (at least [`MIN_CLASS`]), so within 12.5% of `bytes` above
/// 4 KiB. Powers of two and most tensor sizes (multiples of a large power of two) are classes
/// of their own.
pub fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    let floor_pow2 = 1usize << (usize::BITS - 1 - bytes.leading_zeros());
    let step = (floor_pow2 / 8).max(MIN_CLASS);
    bytes.div_ceil(step).saturating_mul(step)
}

/// Counts since the cache was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferStats {
    /// Requests served by an idle buffer.
    pub reused: u64,
    /// Requests no idle buffer could serve (the caller asks the driver).
    pub missed: u64,
    /// Buffers evicted to keep idle memory under the limit, or by `drain` (exact-size buffers,
    /// never kept, are not counted).
    pub evicted: u64,
    /// Bytes and count of the buffers idle now.
    pub idle_bytes: usize,
    pub idle_buffers: usize,
}

/// Idle buffers of type `B` by size, with the order they were given back in.
#[derive(Debug)]
pub struct BufferCache<B> {
    /// Idle buffers by size; each queue in the order they were given back (oldest first),
    /// with the sequence number they were given back at.
    idle: BTreeMap<usize, VecDeque<(u64, B)>>,
    /// The size of every idle buffer by the sequence number it was given back at: the
    /// eviction order.
    by_age: BTreeMap<u64, usize>,
    next_seq: u64,
    limit: usize,
    stats: BufferStats,
}

impl<B> BufferCache<B> {
    /// A cache keeping at most `limit` idle bytes (0 keeps nothing: every buffer given back is
    /// evicted).
    pub fn new(limit: usize) -> Self {
        Self {
            idle: BTreeMap::new(),
            by_age: BTreeMap::new(),
            next_seq: 0,
            limit,
            stats: BufferStats::default(),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Changes the idle limit; returns the buffers evicted to meet it.
    pub fn set_limit(&mut self, limit: usize) -> Vec<B> {
        self.limit = limit;
        let mut evicted = Vec::new();
        self.evict_until(0, &mut evicted);
        evicted
    }

    pub fn stats(&self) -> BufferStats {
        self.stats
    }

    /// An idle buffer of `need`'s size class, with that size, or `None`: the caller then
    /// allocates `size_class(need)` bytes itself (so that the buffer can be kept when it comes
    /// back).
    pub fn take(&mut self, need: usize) -> Option<(usize, B)> {
        let size = size_class(need);
        let Some(queue) = self.idle.get_mut(&size) else {
            self.stats.missed += 1;
            return None;
        };
        let (seq, buf) = queue.pop_back()?;
        if queue.is_empty() {
            self.idle.remove(&size);
        }
        self.by_age.remove(&seq);
        self.stats.reused += 1;
        self.stats.idle_bytes -= size;
        self.stats.idle_buffers -= 1;
        Some((size, buf))
    }

    /// Takes back a buffer of `size` bytes that nothing will read or write again; returns the
    /// buffers evicted to stay within the limit, or this one when it is not kept, for the
    /// caller to free.
    pub fn give_back(&mut self, size: usize, buf: B) -> Vec<B> {
        let mut evicted = Vec::new();
        if size_class(size) != size {
            evicted.push(buf); // an exact-size buffer: never kept, not counted as evicted
            return evicted;
        }
        if size > self.limit {
            self.stats.evicted += 1;
            evicted.push(buf);
            return evicted;
        }
        self.evict_until(size, &mut evicted);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.idle.entry(size).or_default().push_back((seq, buf));
        self.by_age.insert(seq, size);
        self.stats.idle_bytes += size;
        self.stats.idle_buffers += 1;
        evicted
    }

    /// Evicts every idle buffer.
    pub fn drain(&mut self) -> Vec<B> {
        let mut evicted = Vec::new();
        let limit = std::mem::replace(&mut self.limit, 0);
        self.evict_until(0, &mut evicted);
        self.limit = limit;
        evicted
    }

    /// Evicts the oldest idle buffers until `incoming` more bytes fit under the limit.
    fn evict_until(&mut self, incoming: usize, evicted: &mut Vec<B>) {
        while self.stats.idle_bytes + incoming > self.limit {
            let Some((seq, size)) = self.by_age.pop_first() else {
                break;
            };
            let Some(queue) = self.idle.get_mut(&size) else {
                break;
            };
            // The oldest buffer of the cache is the oldest of its size.
            let Some((oldest, buf)) = queue.pop_front() else {
                break;
            };
            debug_assert_eq!(oldest, seq);
            if queue.is_empty() {
                self.idle.remove(&size);
            }
            self.stats.idle_bytes -= size;
            self.stats.idle_buffers -= 1;
            self.stats.evicted += 1;
            evicted.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache holding buffers numbered 0, 1, ... of the given sizes, given back in that order.
    fn cache(limit: usize, sizes: &[usize]) -> BufferCache<usize> {
        let mut c = BufferCache::new(limit);
        for (id, &size) in sizes.iter().enumerate() {
            assert!(c.give_back(size, id).is_empty());
        }
        c
    }

    /// xorshift64: fixed pseudo-random sequences for the property tests.
    fn rng(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    #[test]
    fn size_classes_round_up_by_at_most_an_eighth_and_are_their_own_class() {
        assert_eq!(size_class(0), MIN_CLASS);
        assert_eq!(size_class(1), MIN_CLASS);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(4097), 4608);
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(size_class((1 << 20) + 1), (1 << 20) + (1 << 17));
        // A 2048 x 5632 bf16 weight (22 MiB) is a class; 125 MiB rounds to 128 MiB.
        assert_eq!(size_class(22 << 20), 22 << 20);
        assert_eq!(size_class(125 << 20), 128 << 20);
        let mut next = rng(0x9e37_79b9);
        let mut last = 0;
        for bytes in (1..20_000).chain((0..20_000).map(|_| 1 + (next() % (1 << 34)) as usize)) {
            let class = size_class(bytes);
            assert!(class >= bytes, "{bytes}: class {class}");
            if bytes > 4096 {
                assert!(
                    class - bytes <= bytes / 8,
                    "{bytes}: class {class} wastes more than an eighth"
                );
            }
            assert_eq!(
                size_class(class),
                class,
                "{bytes}: class {class} is not its own class"
            );
            if bytes < 20_000 {
                assert!(class >= last, "classes grow with the request");
                last = class;
            }
        }
    }

    #[test]
    fn a_request_takes_an_idle_buffer_of_its_class_only() {
        let mut c = cache(1 << 20, &[1024, 1536, 4096]);
        assert_eq!(c.take(1000), Some((1024, 0)));
        assert_eq!(
            c.take(1000),
            None,
            "a larger idle buffer does not serve another class"
        );
        assert_eq!(c.take(1025), Some((1536, 1)));
        assert_eq!(c.take(4096), Some((4096, 2)));
        let s = c.stats();
        assert_eq!((s.reused, s.missed, s.idle_bytes, s.idle_buffers), (3, 1, 0, 0));
    }

    #[test]
    fn the_buffer_given_back_last_is_taken_first() {
        let mut c = cache(1 << 20, &[512, 512, 512]);
        assert_eq!(c.take(512), Some((512, 2)));
        assert_eq!(c.take(300), Some((512, 1)));
        assert!(c.give_back(512, 7).is_empty());
        assert_eq!(c.take(512), Some((512, 7)));
        assert_eq!(c.take(512), Some((512, 0)));
    }

    #[test]
    fn a_buffer_that_is_not_a_class_is_not_kept() {
        let mut c = cache(1 << 20, &[]);
        assert_eq!(c.give_back(1000, 1), vec![1]);
        assert_eq!(c.stats().idle_buffers, 0);
        assert_eq!(c.stats().evicted, 0, "an exact-size buffer is not an eviction");
    }

    /// Runs `pass` (each request's size and how many later requests it outlives) against the
    /// cache, numbering the buffers it has to allocate from `next_id`; returns the misses.
    fn run_pass(c: &mut BufferCache<usize>, pass: &[(usize, usize)], next_id: &mut usize) -> usize {
        let mut live: Vec<(usize, usize, usize)> = Vec::new();
        let mut missed = 0;
        for (i, &(need, outlives)) in pass.iter().enumerate() {
            let (size, id) = c.take(need).unwrap_or_else(|| {
                missed += 1;
                *next_id += 1;
                (size_class(need), *next_id)
            });
            assert_eq!(size, size_class(need));
            live.push((i + outlives, size, id));
            let (dead, alive): (Vec<_>, Vec<_>) = live.into_iter().partition(|&(end, _, _)| end <= i);
            live = alive;
            for (_, size, id) in dead {
                assert!(c.give_back(size, id).is_empty());
            }
        }
        for (_, size, id) in live {
            assert!(c.give_back(size, id).is_empty());
        }
        missed
    }

    #[test]
    fn a_repeated_pass_asks_for_nothing_the_second_time() {
        let mut next = rng(0x2545_f491);
        let mut next_id = 0;
        for _ in 0..2000 {
            let len = 3 + (next() % 40) as usize;
            let pass: Vec<(usize, usize)> = (0..len)
                .map(|_| (1 + (next() % 100_000) as usize, (next() % 6) as usize))
                .collect();
            let mut c = BufferCache::new(usize::MAX);
            assert!(run_pass(&mut c, &pass, &mut next_id) > 0);
            assert_eq!(run_pass(&mut c, &pass, &mut next_id), 0, "second run of {pass:?}");
            assert_eq!(run_pass(&mut c, &pass, &mut next_id), 0, "third run of {pass:?}");
        }
    }

    #[test]
    fn giving_back_beyond_the_limit_evicts_the_buffers_given_back_longest_ago() {
        let mut c = cache(4096, &[1536, 1024, 1536]);
        assert_eq!(c.give_back(1024, 3), vec![0]);
        assert_eq!(c.stats().idle_bytes, 3584);
        assert_eq!(c.give_back(512, 4), Vec::<usize>::new());
        assert_eq!(c.give_back(1024, 5), vec![1]);
        assert_eq!(c.stats().idle_bytes, 4096);
        assert_eq!(c.take(1024), Some((1024, 5)));
        assert_eq!(c.take(1024), Some((1024, 3)));
        assert_eq!(c.take(1024), None);
        assert_eq!(c.take(1536), Some((1536, 2)));
        assert_eq!(c.stats().evicted, 2);
    }

    #[test]
    fn a_buffer_larger_than_the_limit_is_not_kept_and_zero_keeps_nothing() {
        let mut c = cache(1024, &[512]);
        assert_eq!(c.give_back(1536, 9), vec![9]);
        assert_eq!(c.stats().idle_bytes, 512);
        let mut off = BufferCache::new(0);
        assert_eq!(off.give_back(512, 1), vec![1]);
        assert_eq!(off.take(512), None);
    }

    #[test]
    fn drain_and_a_lower_limit_evict_oldest_first() {
        let mut c = cache(1 << 20, &[512, 1024, 1536]);
        assert_eq!(c.set_limit(2048), vec![0, 1]);
        assert_eq!(c.limit(), 2048);
        assert!(c.give_back(512, 3).is_empty());
        assert_eq!(c.drain(), vec![2, 3]);
        assert_eq!(c.stats().idle_bytes, 0);
        assert_eq!(c.limit(), 2048);
        assert!(c.give_back(512, 4).is_empty());
    }

    #[test]
    fn the_idle_bytes_always_match_the_idle_buffers() {
        // Takes and give-backs in a fixed pseudo-random order, checked against a count.
        let limit = 20_000;
        let mut c = BufferCache::new(limit);
        let mut held: Vec<(usize, usize)> = Vec::new();
        let mut next = rng(0x1234_5678);
        for id in 0..5000 {
            let need = 1 + (next() % 5000) as usize;
            match next() % 3 {
                0 => {
                    if let Some(taken) = c.take(need) {
                        held.push(taken);
                    }
                }
                1 if !held.is_empty() => {
                    let (size, buf) = held.swap_remove((next() % held.len() as u64) as usize);
                    c.give_back(size, buf);
                }
                _ => {
                    c.give_back(size_class(need), 10_000 + id);
                }
            }
            let s = c.stats();
            let counted: usize = c.idle.iter().map(|(size, q)| size * q.len()).sum();
            assert_eq!(s.idle_bytes, counted);
            assert_eq!(s.idle_buffers, c.by_age.len());
            assert_eq!(s.idle_buffers, c.idle.values().map(VecDeque::len).sum::<usize>());
            assert!(c.idle.values().all(|q| !q.is_empty()));
            assert!(s.idle_bytes <= limit);
        }
    }
}
