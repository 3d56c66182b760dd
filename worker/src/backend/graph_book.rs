//! The bookkeeping of recorded decode steps (CUDA graphs), apart from the device calls so that it
//! is tested without a GPU: which batch sizes have staged inputs and a recording, when a
//! recording may be replayed, and when it must be recorded again or given up. The CUDA backend
//! (`backend/cuda/graph.rs`) carries out its decisions.
//!
//! The rules:
//! - only decode plans (one new token per sequence) of at most `max_batch` sequences are staged;
//! - only the plan prepared last counts as staged, so a step whose plan was uploaded the ordinary
//!   way is never replayed over stale inputs, and each staged plan serves one step;
//! - recordings belong to one key (the key/value pool, and so the model): a step with another
//!   key forgets them all, and forgives earlier capture failures;
//! - a staged plan whose block tables outgrow the batch size's table buffer gets a buffer twice
//!   as large (or as large as needed), and the recording that read the old one is forgotten;
//! - a batch size whose capture failed runs plainly until the key changes.

use std::collections::HashMap;

/// Block-table entries a batch size's table buffer starts with, per sequence (a context of 1024
/// positions at 16 per block).
pub const INITIAL_BLOCKS_PER_SEQUENCE: usize = 64;

/// What to do with a prepared plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Staging {
    /// Upload it the ordinary way.
    Plain,
    /// Copy it into the batch size's fixed buffers: create them first (`create`, the table
    /// buffer holding `table_capacity` entries), or replace the table buffer with one of
    /// `table_capacity` entries (`grow_tables`; the recording that read the old one is forgotten).
    Stage {
        create: bool,
        grow_tables: bool,
        table_capacity: usize,
    },
}

/// What to do with a step's forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepAction {
    /// Run it the ordinary way.
    Plain,
    /// Launch the batch size's recording over the staged inputs.
    Replay,
    /// Record it (then launch the recording).
    Record,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BatchState {
    table_capacity: usize,
    recorded: bool,
    ungraphable: bool,
    /// The plan prepared last was staged here.
    fresh: bool,
}

/// The recorded decode steps of one backend, by batch size.
#[derive(Clone, Debug)]
pub struct GraphBook {
    max_batch: usize,
    key: Option<u64>,
    batches: HashMap<usize, BatchState>,
}

impl GraphBook {
    /// Recording decode steps of up to `max_batch` sequences.
    pub fn new(max_batch: usize) -> Self {
        Self {
            max_batch,
            key: None,
            batches: HashMap::new(),
        }
    }

    /// The largest batch size recorded.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// A plan of `batch` sequences is being prepared; `decode` when each has one new token,
    /// `table_entries` the block-table entries it uploads.
    pub fn prepare(&mut self, batch: usize, decode: bool, table_entries: usize) -> Staging {
        for state in self.batches.values_mut() {
            state.fresh = false;
        }
        if !decode || batch == 0 || batch > self.max_batch {
            return Staging::Plain;
        }
        let mut create = false;
        let state = self.batches.entry(batch).or_insert_with(|| {
            create = true;
            BatchState {
                table_capacity: (batch * INITIAL_BLOCKS_PER_SEQUENCE).max(table_entries),
                recorded: false,
                ungraphable: false,
                fresh: false,
            }
        });
        if state.ungraphable {
            return Staging::Plain;
        }
        let grow_tables = state.table_capacity < table_entries;
        if grow_tables {
            state.table_capacity = table_entries.max(2 * state.table_capacity);
            state.recorded = false;
        }
        state.fresh = true;
        Staging::Stage {
            create,
            grow_tables,
            table_capacity: state.table_capacity,
        }
    }

    /// A decode step of `batch` sequences with `key` is about to run its forward pass (right
    /// after its plan was prepared).
    pub fn step(&mut self, key: u64, batch: usize) -> StepAction {
        if self.key != Some(key) {
            for state in self.batches.values_mut() {
                state.recorded = false;
                state.ungraphable = false;
            }
            self.key = Some(key);
        }
        let Some(state) = self.batches.get_mut(&batch) else {
            return StepAction::Plain;
        };
        if state.ungraphable || !state.fresh {
            return StepAction::Plain;
        }
        state.fresh = false;
        if state.recorded {
            StepAction::Replay
        } else {
            StepAction::Record
        }
    }

    /// The step of `batch` sequences was recorded.
    pub fn recorded(&mut self, batch: usize) {
        if let Some(state) = self.batches.get_mut(&batch) {
            state.recorded = true;
        }
    }

    /// Recording (or staging) for `batch` failed: run it plainly until the key changes.
    pub fn failed(&mut self, batch: usize) {
        if let Some(state) = self.batches.get_mut(&batch) {
            state.recorded = false;
            state.ungraphable = true;
        }
    }

    /// Forgets `batch` entirely (its buffers could not be created).
    pub fn forget(&mut self, batch: usize) {
        self.batches.remove(&batch);
    }

    /// Whether `batch` has a recording to replay.
    pub fn is_recorded(&self, batch: usize) -> bool {
        self.batches.get(&batch).is_some_and(|s| s.recorded)
    }

    /// The batch sizes with a recording, ascending.
    pub fn recorded_batches(&self) -> Vec<usize> {
        let mut batches: Vec<usize> = self
            .batches
            .iter()
            .filter(|(_, s)| s.recorded)
            .map(|(&b, _)| b)
            .collect();
        batches.sort_unstable();
        batches
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Staging = Staging::Stage {
        create: true,
        grow_tables: false,
        table_capacity: 2 * INITIAL_BLOCKS_PER_SEQUENCE,
    };
    const AGAIN: Staging = Staging::Stage {
        create: false,
        grow_tables: false,
        table_capacity: 2 * INITIAL_BLOCKS_PER_SEQUENCE,
    };

    #[test]
    fn a_batch_size_records_once_then_replays() {
        let mut book = GraphBook::new(8);
        assert_eq!(book.prepare(2, true, 4), FIRST);
        assert_eq!(book.step(7, 2), StepAction::Record);
        book.recorded(2);
        for _ in 0..3 {
            assert_eq!(book.prepare(2, true, 4), AGAIN);
            assert_eq!(book.step(7, 2), StepAction::Replay);
        }
        assert_eq!(book.recorded_batches(), [2]);
    }

    #[test]
    fn only_the_plan_prepared_last_is_replayed() {
        let mut book = GraphBook::new(8);
        book.prepare(2, true, 4);
        book.step(7, 2);
        book.recorded(2);
        // A prompt step in between: uploaded plainly, and it unstages batch 2.
        assert_eq!(book.prepare(3, false, 9), Staging::Plain);
        assert_eq!(
            book.step(7, 2),
            StepAction::Plain,
            "batch 2's buffers hold an old plan"
        );
        // Another batch size prepared last.
        book.prepare(2, true, 4);
        book.prepare(4, true, 8);
        assert_eq!(book.step(7, 2), StepAction::Plain);
        // A staged plan serves one step.
        book.prepare(2, true, 4);
        assert_eq!(book.step(7, 2), StepAction::Replay);
        assert_eq!(book.step(7, 2), StepAction::Plain);
    }

    #[test]
    fn another_key_records_again_and_forgives_failures() {
        let mut book = GraphBook::new(8);
        book.prepare(1, true, 1);
        book.step(7, 1);
        book.recorded(1);
        book.prepare(3, true, 3);
        assert_eq!(book.step(7, 3), StepAction::Record);
        book.failed(3);
        assert_eq!(
            book.prepare(3, true, 3),
            Staging::Plain,
            "failed: plain until the key changes"
        );
        // A step from another pool.
        book.prepare(1, true, 1);
        assert_eq!(book.step(8, 1), StepAction::Record);
        assert!(!book.is_recorded(1));
        book.recorded(1);
        assert!(matches!(
            book.prepare(3, true, 3),
            Staging::Stage { create: false, .. }
        ));
        assert_eq!(book.step(8, 3), StepAction::Record);
    }

    #[test]
    fn outgrown_tables_grow_and_record_again() {
        let mut book = GraphBook::new(8);
        let start = INITIAL_BLOCKS_PER_SEQUENCE;
        book.prepare(1, true, 1);
        book.step(7, 1);
        book.recorded(1);
        assert_eq!(
            book.prepare(1, true, start + 1),
            Staging::Stage {
                create: false,
                grow_tables: true,
                table_capacity: 2 * start,
            }
        );
        assert_eq!(
            book.step(7, 1),
            StepAction::Record,
            "the recording read the old buffer"
        );
        book.recorded(1);
        // Far past double: as large as needed.
        assert_eq!(
            book.prepare(1, true, 10 * start),
            Staging::Stage {
                create: false,
                grow_tables: true,
                table_capacity: 10 * start,
            }
        );
        // A first plan larger than the default starts large enough.
        assert_eq!(
            book.prepare(2, true, 5 * start),
            Staging::Stage {
                create: true,
                grow_tables: false,
                table_capacity: 5 * start,
            }
        );
    }

    #[test]
    fn large_batches_and_prompts_are_never_staged() {
        let mut book = GraphBook::new(4);
        assert_eq!(book.prepare(5, true, 5), Staging::Plain);
        assert_eq!(book.prepare(2, false, 5), Staging::Plain);
        assert_eq!(book.prepare(0, true, 0), Staging::Plain);
        assert_eq!(book.step(7, 5), StepAction::Plain);
        assert_eq!(book.step(7, 2), StepAction::Plain);
        assert!(book.recorded_batches().is_empty());
        // Buffers that could not be created are forgotten, and created again next time.
        assert!(matches!(
            book.prepare(3, true, 3),
            Staging::Stage { create: true, .. }
        ));
        book.forget(3);
        assert!(matches!(
            book.prepare(3, true, 3),
            Staging::Stage { create: true, .. }
        ));
    }
}
