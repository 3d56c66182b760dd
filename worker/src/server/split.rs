//! Running a batch that the device cannot hold in smaller pieces. A pass's working memory grows
//! with the tokens it holds (activations, attention scores), so a batch that runs out of device
//! memory is split in two and each half retried, down to single items; only an item that runs
//! out of memory alone fails, with that error. When a split piece then runs, the cost of the
//! largest piece that ran (in the caller's units: new tokens of a decode step, padded tokens of
//! an encoder batch) becomes the limit on later pieces, so the next batches do not run out the
//! same way before they split; the limit doubles after [`PieceLimit::RELAX_AFTER`] batches in
//! a row without running out (the memory was taken by a long sequence that has finished, or by
//! a batch of long inputs). A single item too large alone teaches nothing: it fails, and the
//! limit stays, so one oversized request does not slow everyone else's batches.
//!
//! Retrying is safe for both model threads: an encoder pass has no state, and a decode step
//! commits its key/value cache positions only when it completes (a failed step's writes are
//! overwritten by the next); the generator draws its random numbers before the batch and hands
//! each piece its own, so a seeded request samples as if nothing had been split. A device
//! failure (the context unusable) fails the rest of the batch at once instead of trying it.
//! Pure and sans-IO: the pass is a closure over a range of the batch.

use std::ops::Range;

/// How a pass over a piece of the batch ended.
#[derive(Debug)]
pub enum Pass<T, E> {
    /// It ran: one result per item of the piece, in order.
    Ran(Vec<T>),
    /// The device ran out of memory; the piece may run in smaller pieces.
    OutOfMemory(E),
    /// Any other failure of this piece: it fails every item of the piece.
    Failed(E),
    /// The device failed: every item not yet run fails too, without running.
    DeviceFailed(E),
}

/// Why an item got no result.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure<E> {
    /// It ran out of device memory on its own.
    OutOfMemory(E),
    /// Its piece failed otherwise (or ran and gave the wrong number of results), or the device
    /// failed before it ran.
    Failed(E),
}

/// A batch's results, one per item in order, and how many times a piece was split.
#[derive(Debug)]
pub struct Outcome<T, E> {
    /// Each item's result.
    pub results: Vec<Result<T, Failure<E>>>,
    /// Pieces that ran out of memory and were split in two.
    pub splits: usize,
    /// The pieces that ran: their item counts and costs (for the batch metrics).
    pub ran: Vec<(usize, usize)>,
}

/// The most a piece may cost, learned from the batches that ran out of memory.
#[derive(Debug, Default)]
pub struct PieceLimit {
    most: Option<usize>,
    clean_batches: usize,
}

impl PieceLimit {
    /// Batches in a row without running out of memory after which the limit doubles.
    pub const RELAX_AFTER: usize = 64;

    /// No limit yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The most a piece costs now (`None`: no limit, the whole batch runs as one).
    pub fn most(&self) -> Option<usize> {
        self.most
    }

    /// Runs `pass` over the items `0..n`, in order: in pieces of consecutive items whose
    /// `cost` is at most the limit (at least one item a piece), a piece that runs out of memory
    /// split in halves that run before the next piece. A pass that gives the wrong number of
    /// results fails its piece with `wrong_count(results, items)`.
    pub fn run<T, E: Clone>(
        &mut self,
        n: usize,
        cost: impl Fn(Range<usize>) -> usize,
        mut pass: impl FnMut(Range<usize>) -> Pass<T, E>,
        wrong_count: impl Fn(usize, usize) -> E,
    ) -> Outcome<T, E> {
        let mut results: Vec<Option<Result<T, Failure<E>>>> = (0..n).map(|_| None).collect();
        // Pieces to run, the next one last.
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < n {
            let mut end = start + 1;
            while end < n && self.most.is_none_or(|most| cost(start..end + 1) <= most) {
                end += 1;
            }
            pieces.push(start..end);
            start = end;
        }
        pieces.reverse();
        let (mut splits, mut ran) = (0, Vec::new());
        while let Some(piece) = pieces.pop() {
            match pass(piece.clone()) {
                Pass::Ran(out) if out.len() == piece.len() => {
                    ran.push((piece.len(), cost(piece.clone())));
                    for (slot, r) in results[piece].iter_mut().zip(out) {
                        *slot = Some(Ok(r));
                    }
                }
                Pass::Ran(out) => fail_all(&mut results[piece.clone()], &wrong_count(out.len(), piece.len())),
                Pass::OutOfMemory(e) if piece.len() == 1 => {
                    results[piece.start] = Some(Err(Failure::OutOfMemory(e)));
                }
                Pass::OutOfMemory(_) => {
                    splits += 1;
                    let middle = piece.start + piece.len() / 2;
                    pieces.push(middle..piece.end);
                    pieces.push(piece.start..middle);
                }
                Pass::Failed(e) => fail_all(&mut results[piece], &e),
                Pass::DeviceFailed(e) => {
                    fail_all(&mut results[piece.start..], &e);
                    break;
                }
            }
        }
        let largest_run = ran.iter().map(|&(_, c)| c).max();
        match (splits, largest_run) {
            (1.., Some(largest)) => {
                self.most = Some(largest.max(1));
                self.clean_batches = 0;
            }
            (0, _)
                if results
                    .iter()
                    .all(|r| !matches!(r, Some(Err(Failure::OutOfMemory(_))))) =>
            {
                if let Some(most) = self.most {
                    self.clean_batches += 1;
                    if self.clean_batches >= Self::RELAX_AFTER {
                        self.most = Some(most.saturating_mul(2));
                        self.clean_batches = 0;
                    }
                }
            }
            _ => {}
        }
        let results = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Failure::Failed(wrong_count(0, 1)))))
            .collect();
        Outcome { results, splits, ran }
    }
}

/// Fails every item of `slots` with `e`.
fn fail_all<T, E: Clone>(slots: &mut [Option<Result<T, Failure<E>>>], e: &E) {
    for slot in slots {
        *slot = Some(Err(Failure::Failed(e.clone())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device that runs out of memory on pieces costing more than `fits` (an item costs its
    /// weight, one unless `weights` says otherwise); of the pieces that fit, fails as a device
    /// on one holding `lost` and fails one holding `poisoned`; records the pieces it was given.
    struct Device {
        fits: usize,
        weights: Vec<usize>,
        poisoned: Option<usize>,
        lost: Option<usize>,
        pieces: Vec<Range<usize>>,
    }

    impl Device {
        fn new(fits: usize) -> Self {
            Self {
                fits,
                weights: Vec::new(),
                poisoned: None,
                lost: None,
                pieces: Vec::new(),
            }
        }

        fn cost(&self, piece: Range<usize>) -> usize {
            piece.map(|i| self.weights.get(i).copied().unwrap_or(1)).sum()
        }

        fn pass(&mut self, piece: Range<usize>) -> Pass<usize, String> {
            self.pieces.push(piece.clone());
            let cost = self.cost(piece.clone());
            if cost > self.fits {
                return Pass::OutOfMemory(format!("{cost} does not fit"));
            }
            if self.lost.is_some_and(|p| piece.contains(&p)) {
                return Pass::DeviceFailed(format!("device lost in {piece:?}"));
            }
            if self.poisoned.is_some_and(|p| piece.contains(&p)) {
                return Pass::Failed(format!("bad item in {piece:?}"));
            }
            Pass::Ran(piece.map(|i| i * 10).collect())
        }
    }

    /// Runs a batch of `n` on `device` under `limit`.
    fn run(limit: &mut PieceLimit, device: &mut Device, n: usize) -> Outcome<usize, String> {
        let weights = device.weights.clone();
        let cost = move |r: Range<usize>| r.map(|i| weights.get(i).copied().unwrap_or(1)).sum();
        limit.run(n, cost, |r| device.pass(r), wrong)
    }

    fn wrong(got: usize, want: usize) -> String {
        format!("{got} results for {want} items")
    }

    fn values(outcome: &Outcome<usize, String>) -> Vec<Option<usize>> {
        outcome.results.iter().map(|r| r.as_ref().ok().copied()).collect()
    }

    #[test]
    fn a_batch_that_fits_runs_whole_and_sets_no_limit() {
        let mut limit = PieceLimit::new();
        let mut device = Device::new(8);
        let out = run(&mut limit, &mut device, 5);
        assert_eq!(values(&out), (0..5).map(|i| Some(i * 10)).collect::<Vec<_>>());
        assert_eq!((out.splits, out.ran.clone()), (0, vec![(5, 5)]));
        assert_eq!(device.pieces, vec![0..5]);
        assert_eq!(limit.most(), None);
    }

    #[test]
    fn a_batch_out_of_memory_runs_in_halves_in_order_and_every_item_gets_its_result() {
        for n in 1..=20 {
            for fits in 1..=n {
                let mut limit = PieceLimit::new();
                let mut device = Device::new(fits);
                let out = run(&mut limit, &mut device, n);
                assert_eq!(
                    values(&out),
                    (0..n).map(|i| Some(i * 10)).collect::<Vec<_>>(),
                    "n {n}, fits {fits}"
                );
                // The pieces that ran cover the batch once, in order.
                let ran: Vec<_> = device
                    .pieces
                    .iter()
                    .filter(|p| p.len() <= fits)
                    .cloned()
                    .collect();
                assert_eq!(ran.first().map(|p| p.start), Some(0), "n {n}, fits {fits}");
                assert!(ran.windows(2).all(|w| w[0].end == w[1].start), "{ran:?}");
                assert_eq!(ran.last().map(|p| p.end), Some(n));
                assert_eq!(out.ran.len(), ran.len());
                assert_eq!(
                    out.splits,
                    device.pieces.len() - ran.len(),
                    "every piece that ran out was split"
                );
                if fits < n {
                    let most = limit.most().expect("a limit after running out");
                    assert!(
                        most <= fits && most * 2 > fits,
                        "n {n}, fits {fits}: limit {most}"
                    );
                } else {
                    assert_eq!(limit.most(), None);
                }
            }
        }
    }

    #[test]
    fn the_limit_is_a_cost_so_cheap_items_share_a_piece_that_one_costly_batch_taught() {
        let mut limit = PieceLimit::new();
        // Four long prompts (cost 6 each) on a device that holds 12: halves of two ran.
        let mut device = Device {
            weights: vec![6; 4],
            ..Device::new(12)
        };
        let out = run(&mut limit, &mut device, 4);
        assert_eq!(out.splits, 1);
        assert_eq!(limit.most(), Some(12));
        // Then twelve one-token steps run as one piece, not in pairs.
        let mut device = Device::new(12);
        let out = run(&mut limit, &mut device, 12);
        assert_eq!(device.pieces, vec![0..12]);
        assert_eq!(out.splits, 0);
        // And a batch over the limit is cut by cost before it runs: 5 + 5 fit 12, the third does not.
        let mut device = Device {
            weights: vec![5; 5],
            ..Device::new(12)
        };
        let out = run(&mut limit, &mut device, 5);
        assert_eq!(device.pieces, vec![0..2, 2..4, 4..5]);
        assert_eq!(out.splits, 0);
    }

    #[test]
    fn the_limit_keeps_later_batches_from_running_out_and_relaxes_after_clean_batches() {
        let mut limit = PieceLimit::new();
        let mut device = Device::new(3);
        run(&mut limit, &mut device, 12);
        assert_eq!(limit.most(), Some(3));
        device.pieces.clear();
        let out = run(&mut limit, &mut device, 7);
        assert_eq!(
            device.pieces,
            vec![0..3, 3..6, 6..7],
            "pieces of the limit, none ran out"
        );
        assert_eq!(out.splits, 0);
        for _ in 1..PieceLimit::RELAX_AFTER {
            run(&mut limit, &mut device, 2);
        }
        assert_eq!(
            limit.most(),
            Some(6),
            "doubled after {} clean batches",
            PieceLimit::RELAX_AFTER
        );
        device.pieces.clear();
        let out = run(&mut limit, &mut device, 6);
        assert_eq!(
            device.pieces,
            vec![0..6, 0..3, 3..6],
            "a probe that ran out splits again"
        );
        assert_eq!(out.splits, 1);
        assert_eq!(limit.most(), Some(3));
    }

    #[test]
    fn only_an_item_out_of_memory_alone_fails_and_it_does_not_lower_the_limit() {
        let mut limit = PieceLimit::new();
        let mut device = Device::new(0); // nothing fits
        let out = run(&mut limit, &mut device, 3);
        for r in &out.results {
            assert_eq!(r, &Err(Failure::OutOfMemory("1 does not fit".to_owned())));
        }
        assert_eq!(limit.most(), None, "nothing ran: nothing learned");
        // One oversized item beside ones that fit: it fails alone, the others run, and the
        // limit is what ran.
        let mut device = Device {
            weights: vec![1, 9, 1, 1],
            ..Device::new(4)
        };
        let out = run(&mut limit, &mut device, 4);
        assert_eq!(values(&out), vec![Some(0), None, Some(20), Some(30)]);
        assert_eq!(limit.most(), Some(2));
        // A batch of that oversized item alone teaches nothing and is not a clean batch.
        let mut device = Device {
            weights: vec![9],
            ..Device::new(4)
        };
        assert!(run(&mut limit, &mut device, 1).results[0].is_err());
        assert_eq!(limit.most(), Some(2));
    }

    #[test]
    fn another_failure_fails_its_piece_and_spares_the_rest() {
        let mut limit = PieceLimit::new();
        let mut device = Device {
            poisoned: Some(5),
            ..Device::new(2)
        };
        let out = run(&mut limit, &mut device, 8);
        for (i, r) in out.results.iter().enumerate() {
            if i == 4 || i == 5 {
                assert_eq!(
                    r,
                    &Err(Failure::Failed("bad item in 4..6".to_owned())),
                    "item {i}"
                );
            } else {
                assert_eq!(r, &Ok(i * 10), "item {i}");
            }
        }
    }

    #[test]
    fn a_device_failure_fails_every_item_not_yet_run_without_running_it() {
        let mut limit = PieceLimit::new();
        let mut device = Device {
            lost: Some(2),
            ..Device::new(2)
        };
        let out = run(&mut limit, &mut device, 8);
        assert_eq!(
            device.pieces,
            vec![0..8, 0..4, 0..2, 2..4],
            "nothing ran after the failure"
        );
        assert_eq!(values(&out)[..2], [Some(0), Some(10)]);
        for r in &out.results[2..] {
            assert_eq!(r, &Err(Failure::Failed("device lost in 2..4".to_owned())));
        }
    }

    #[test]
    fn a_pass_with_the_wrong_number_of_results_fails_its_piece() {
        let mut limit = PieceLimit::new();
        let out = limit.run(3, |r| r.len(), |_| Pass::<usize, String>::Ran(vec![1]), wrong);
        for r in &out.results {
            assert_eq!(r, &Err(Failure::Failed("1 results for 3 items".to_owned())));
        }
        let empty = limit.run(0, |r| r.len(), |_| Pass::<usize, String>::Ran(vec![]), wrong);
        assert!(empty.results.is_empty());
    }
}
