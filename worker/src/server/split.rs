//! Running a batch that the device cannot hold in smaller pieces. A pass's working memory grows
//! with its batch (activations, attention scores), so a batch that runs out of device memory is
//! split in two and each half retried, down to single items; only an item that runs out of
//! memory alone fails, with that error. The size of the largest piece that ran becomes the limit
//! on later pieces, so the next batches do not run out the same way before they split, and the
//! limit doubles again after [`PieceLimit::RELAX_AFTER`] batches without running out (the memory
//! was taken by a long sequence that has finished, or by a batch of long inputs).
//!
//! Retrying is safe for both model threads: an encoder pass has no state, and a decode step
//! commits its key/value cache positions only when it completes (a failed step's writes are
//! overwritten by the next); the generator draws its random numbers before the batch and hands
//! each piece its own, so a seeded request samples as if nothing had been split. Pure and
//! sans-IO: the pass is a closure over a range of the batch.

use std::ops::Range;

/// How a pass over a piece of the batch ended.
#[derive(Debug)]
pub enum Pass<T, E> {
    /// It ran: one result per item of the piece, in order.
    Ran(Vec<T>),
    /// The device ran out of memory; the piece may run in smaller pieces.
    OutOfMemory(E),
    /// Any other failure: it fails every item of the piece.
    Failed(E),
}

/// Why an item got no result.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure<E> {
    /// It ran out of device memory on its own.
    OutOfMemory(E),
    /// Its piece failed otherwise (or ran and gave the wrong number of results).
    Failed(E),
}

/// A batch's results, one per item in order, and how many times a piece was split.
#[derive(Debug)]
pub struct Outcome<T, E> {
    /// Each item's result.
    pub results: Vec<Result<T, Failure<E>>>,
    /// Pieces that ran out of memory and were split in two.
    pub splits: usize,
}

/// The most items a piece may hold, learned from the batches that ran out of memory.
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

    /// The most items a piece holds now (`None`: the whole batch).
    pub fn most(&self) -> Option<usize> {
        self.most
    }

    /// Runs `pass` over the items `0..n`: in pieces of at most the limit, in order, a piece that
    /// runs out of memory split in halves that run before the next piece. A pass that gives the
    /// wrong number of results fails its piece with `wrong_count(results, items)`.
    pub fn run<T, E: Clone>(
        &mut self,
        n: usize,
        mut pass: impl FnMut(Range<usize>) -> Pass<T, E>,
        wrong_count: impl Fn(usize, usize) -> E,
    ) -> Outcome<T, E> {
        let mut results: Vec<Option<Result<T, Failure<E>>>> = (0..n).map(|_| None).collect();
        let size = self.most.unwrap_or(n).max(1);
        // Pieces to run, the next one last.
        let mut pieces: Vec<Range<usize>> = (0..n)
            .step_by(size)
            .map(|start| start..(start + size).min(n))
            .rev()
            .collect();
        let (mut splits, mut ran_out, mut largest_run) = (0, false, 0);
        while let Some(piece) = pieces.pop() {
            match pass(piece.clone()) {
                Pass::Ran(out) if out.len() == piece.len() => {
                    largest_run = largest_run.max(piece.len());
                    for (slot, r) in results[piece].iter_mut().zip(out) {
                        *slot = Some(Ok(r));
                    }
                }
                Pass::Ran(out) => {
                    let e = wrong_count(out.len(), piece.len());
                    for slot in &mut results[piece] {
                        *slot = Some(Err(Failure::Failed(e.clone())));
                    }
                }
                Pass::OutOfMemory(e) => {
                    ran_out = true;
                    if piece.len() == 1 {
                        results[piece.start] = Some(Err(Failure::OutOfMemory(e)));
                    } else {
                        splits += 1;
                        let middle = piece.start + piece.len() / 2;
                        pieces.push(middle..piece.end);
                        pieces.push(piece.start..middle);
                    }
                }
                Pass::Failed(e) => {
                    for slot in &mut results[piece] {
                        *slot = Some(Err(Failure::Failed(e.clone())));
                    }
                }
            }
        }
        if ran_out {
            self.most = Some(largest_run.max(1));
            self.clean_batches = 0;
        } else if let Some(most) = self.most {
            self.clean_batches += 1;
            if self.clean_batches >= Self::RELAX_AFTER {
                self.most = Some(most.saturating_mul(2));
                self.clean_batches = 0;
            }
        }
        let results = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Failure::Failed(wrong_count(0, 1)))))
            .collect();
        Outcome { results, splits }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device that runs out of memory on pieces of more than `fits` items, and fails any other
    /// piece holding `poisoned`; records the pieces it was given.
    struct Device {
        fits: usize,
        poisoned: Option<usize>,
        pieces: Vec<Range<usize>>,
    }

    impl Device {
        fn new(fits: usize) -> Self {
            Self {
                fits,
                poisoned: None,
                pieces: Vec::new(),
            }
        }

        fn pass(&mut self, piece: Range<usize>) -> Pass<usize, String> {
            self.pieces.push(piece.clone());
            if piece.len() > self.fits {
                return Pass::OutOfMemory(format!("{} items do not fit", piece.len()));
            }
            if self.poisoned.is_some_and(|p| piece.contains(&p)) {
                return Pass::Failed(format!("bad item in {piece:?}"));
            }
            Pass::Ran(piece.map(|i| i * 10).collect())
        }
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
        let out = limit.run(5, |r| device.pass(r), wrong);
        assert_eq!(values(&out), (0..5).map(|i| Some(i * 10)).collect::<Vec<_>>());
        assert_eq!(out.splits, 0);
        assert_eq!(device.pieces, vec![0..5]);
        assert_eq!(limit.most(), None);
    }

    #[test]
    fn a_batch_out_of_memory_runs_in_halves_in_order_and_every_item_gets_its_result() {
        for n in 1..=20 {
            for fits in 1..=n {
                let mut limit = PieceLimit::new();
                let mut device = Device::new(fits);
                let out = limit.run(n, |r| device.pass(r), wrong);
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
                let ran_out = device.pieces.len() - ran.len();
                assert_eq!(out.splits, ran_out, "every piece that ran out was split");
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
    fn the_limit_keeps_later_batches_from_running_out_and_relaxes_after_clean_batches() {
        let mut limit = PieceLimit::new();
        let mut device = Device::new(3);
        limit.run(12, |r| device.pass(r), wrong);
        assert_eq!(limit.most(), Some(3));
        device.pieces.clear();
        let out = limit.run(7, |r| device.pass(r), wrong);
        assert_eq!(
            device.pieces,
            vec![0..3, 3..6, 6..7],
            "pieces of the limit, none ran out"
        );
        assert_eq!(out.splits, 0);
        for _ in 1..PieceLimit::RELAX_AFTER {
            limit.run(2, |r| device.pass(r), wrong);
        }
        assert_eq!(
            limit.most(),
            Some(6),
            "doubled after {} clean batches",
            PieceLimit::RELAX_AFTER
        );
        device.pieces.clear();
        let out = limit.run(6, |r| device.pass(r), wrong);
        assert_eq!(
            device.pieces,
            vec![0..6, 0..3, 3..6],
            "a probe that ran out splits again"
        );
        assert_eq!(out.splits, 1);
        assert_eq!(limit.most(), Some(3));
    }

    #[test]
    fn only_an_item_out_of_memory_alone_fails_with_that_error() {
        let mut limit = PieceLimit::new();
        let mut device = Device::new(0); // nothing fits
        let out = limit.run(3, |r| device.pass(r), wrong);
        for r in &out.results {
            assert_eq!(r, &Err(Failure::OutOfMemory("1 items do not fit".to_owned())));
        }
        assert_eq!(limit.most(), Some(1));
    }

    #[test]
    fn another_failure_fails_its_piece_and_spares_the_rest() {
        let mut limit = PieceLimit::new();
        let mut device = Device {
            poisoned: Some(5),
            ..Device::new(2)
        };
        let out = limit.run(8, |r| device.pass(r), wrong);
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
    fn a_pass_with_the_wrong_number_of_results_fails_its_piece() {
        let mut limit = PieceLimit::new();
        let out = limit.run(3, |_| Pass::<usize, String>::Ran(vec![1]), wrong);
        for r in &out.results {
            assert_eq!(r, &Err(Failure::Failed("1 results for 3 items".to_owned())));
        }
        assert_eq!(
            limit
                .run(0, |_| Pass::<usize, String>::Ran(vec![]), wrong)
                .results
                .len(),
            0
        );
    }
}
