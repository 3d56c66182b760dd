//! CUDA graphs for decode steps (opt-in: [`CudaBackend::enable_decode_graphs`], the worker's
//! `--cuda-graph-max-batch`). The decisions (what is staged, when a recording is replayed,
//! recorded again or given up) are made by the pure [`GraphBook`], tested without a GPU; this
//! module holds the device buffers and graphs and carries them out.
//!
//! A decode step of B sequences (one new token each) launches the same kernels with the same
//! arguments every time; only the contents of a few small inputs change: token ids, positions,
//! block tables, the pool rows the new keys go to, and the draws. So the step's launches are
//! captured once per batch size into a graph that reads those inputs from buffers at fixed device
//! addresses, and later steps copy their inputs there and launch the graph: one launch instead of
//! about a dozen per layer, and none of the model's host code.
//!
//! A step (see `Step::choose_tokens` in `models::kv_cache`):
//! 1. `prepare_paged` stages a decode plan of B sequences (B up to the configured maximum) into
//!    batch B's buffers instead of uploading it afresh.
//! 2. `forward_and_sample` stages the ids and draws. If B has a graph it is launched; if not, the
//!    forward pass and the sampling kernel are captured (the embedding and the rotary kernels find
//!    their inputs staged, so nothing is uploaded inside the capture), instantiated and launched.
//!    Either way the chosen ids are read back from B's output buffer.
//! 3. A capture that fails (something the driver cannot record) marks B as not graphable, with a
//!    warning; that step runs again without a graph, and so do B's later steps.
//!
//! What a graph reads must not move: when a step's block tables outgrow B's table buffer, the
//! buffer is replaced and B's graph dropped, so the step records a new one. Activations are
//! allocated inside the capture from the stream-ordered pool, not the buffer cache, which makes
//! them graph-owned memory that every launch reuses; cuBLAS works in the fixed workspace the
//! backend gives it at start-up, so no product allocates inside a capture.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode, CUstreamCaptureStatus};
use cudarc::driver::{CudaGraph, CudaSlice};

use super::context::{CudaBackend, driver_err};
use super::paged::CudaPaged;
use super::tensor::{CudaTensor, DeviceArray};
use crate::backend::graph_book::{GraphBook, Staging, StepAction};
use crate::backend::{BackendError, DecodeStep, PagedPlan, Result};
use crate::sampling::TokenDraw;

/// The decode graphs of one backend and the inputs they read.
pub(super) struct DecodeGraphs {
    book: GraphBook,
    batches: HashMap<usize, BatchGraph>,
}

/// One batch size's staged inputs, output and graph.
struct BatchGraph {
    ids: Arc<DeviceArray<u32>>,
    /// What `ids` holds (`None` until the first step's ids are staged).
    ids_host: Option<Vec<u32>>,
    positions: Arc<DeviceArray<u32>>,
    positions_host: Option<Vec<u32>>,
    meta: Arc<DeviceArray<i32>>,
    tables: Arc<DeviceArray<u32>>,
    slots: Arc<DeviceArray<u32>>,
    /// Four doubles per sequence, as `sample_rows` reads them.
    draws: DeviceArray<f64>,
    out: DeviceArray<u32>,
    graph: Option<RecordedGraph>,
}

/// A graph recorded from the backend's stream, and the buffers that were dropped while it was
/// captured (a recorded kernel may read them at every replay, so they live as long as the
/// graph; usually there are none). Fields drop in order: the graph before its buffers.
struct RecordedGraph {
    graph: CudaGraph,
    _kept: Vec<CudaSlice<u8>>,
}

// SAFETY: a graph's handles may be used from any thread as long as calls on them are
// serialised (the driver's rule for graph objects); this one is only touched while the backend's
// `graphs` mutex is held.
unsafe impl Send for RecordedGraph {}

impl BatchGraph {
    fn new(backend: &CudaBackend, batch: usize, table_entries: usize) -> Result<Self> {
        Ok(Self {
            ids: Arc::new(backend.alloc_staging("graph token ids", batch)?),
            ids_host: None,
            positions: Arc::new(backend.alloc_staging("graph positions", batch)?),
            positions_host: None,
            meta: Arc::new(backend.alloc_staging("graph block table metadata", 4 * batch)?),
            tables: Arc::new(backend.alloc_staging("graph block tables", table_entries)?),
            slots: Arc::new(backend.alloc_staging("graph cache slots", batch)?),
            draws: backend.alloc_staging("graph draws", 4 * batch)?,
            out: backend.alloc_staging("graph token choices", batch)?,
            graph: None,
        })
    }
}

impl CudaBackend {
    /// Records decode steps of up to `max_batch` sequences as CUDA graphs from now on (see the
    /// module docs).
    pub fn enable_decode_graphs(&self, max_batch: usize) {
        *self.graphs.lock().unwrap_or_else(PoisonError::into_inner) = Some(DecodeGraphs {
            book: GraphBook::new(max_batch),
            batches: HashMap::new(),
        });
    }

    /// Drops every recorded graph (graphs stay on and record again): for a change of what a
    /// forward pass launches, such as the matrix-vector switch.
    pub(super) fn forget_decode_graphs(&self) {
        let max_batch = self
            .graphs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|g| g.book.max_batch());
        if let Some(max_batch) = max_batch {
            self.enable_decode_graphs(max_batch);
        }
    }

    /// Whether decode graphs are on.
    pub fn decode_graphs_enabled(&self) -> bool {
        self.graphs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// The batch sizes that have a recorded graph, ascending (for tests and benchmarks: a step
    /// whose capture fails falls back without one, so this says whether graphs are in use).
    pub fn decode_graph_batches(&self) -> Vec<usize> {
        let guard = self.graphs.lock().unwrap_or_else(PoisonError::into_inner);
        guard.as_ref().map_or_else(Vec::new, |g| {
            g.book
                .recorded_batches()
                .into_iter()
                .filter(|b| g.batches.get(b).is_some_and(|s| s.graph.is_some()))
                .collect()
        })
    }

    /// A decode plan (every sequence one new token) staged into its batch size's buffers, or
    /// `None` when graphs are off, the batch is larger than the maximum or not graphable. Called
    /// for every plan: only the plan prepared last counts as staged.
    /// `meta`, `tables` and `slots` are the plan's device layout (see [`CudaPaged`]).
    pub(super) fn stage_decode_plan(
        &self,
        plan: &PagedPlan,
        meta: &[i32],
        tables: &[u32],
        slots: &[u32],
    ) -> Result<Option<CudaPaged>> {
        let mut guard = self.graphs.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(graphs) = guard.as_mut() else {
            return Ok(None);
        };
        let batch = plan.seqs.len();
        let decode = plan.seqs.iter().all(|s| s.q_len == 1);
        let (create, grow_tables, table_capacity) = match graphs.book.prepare(batch, decode, tables.len()) {
            Staging::Plain => return Ok(None),
            Staging::Stage {
                create,
                grow_tables,
                table_capacity,
            } => (create, grow_tables, table_capacity),
        };
        if create {
            match BatchGraph::new(self, batch, table_capacity) {
                Ok(buffers) => {
                    graphs.batches.insert(batch, buffers);
                }
                Err(e) => {
                    // The step runs plainly (its plan uploaded the ordinary way); the next
                    // step of this batch size tries again.
                    graphs.book.forget(batch);
                    tracing::warn!(batch, error = %e, "no staging buffers for a decode graph; this step runs without one");
                    return Ok(None);
                }
            }
        }
        let Some(staged) = graphs.batches.get_mut(&batch) else {
            graphs.book.failed(batch);
            return Ok(None);
        };
        if grow_tables {
            staged.graph = None; // it reads the old buffer
            match self.alloc_staging("graph block tables", table_capacity) {
                Ok(tables) => staged.tables = Arc::new(tables),
                Err(e) => {
                    // The book counts the larger buffer already: this batch size starts afresh
                    // at its next step, and this one runs plainly.
                    graphs.batches.remove(&batch);
                    graphs.book.forget(batch);
                    tracing::warn!(batch, error = %e, "no larger block-table buffer for a decode graph; this step runs without one");
                    return Ok(None);
                }
            }
        }
        let positions: Vec<u32> = plan
            .seqs
            .iter()
            .map(|s| u32::try_from(s.k_len - 1).unwrap_or(u32::MAX))
            .collect();
        self.copy_to_array("staged block table metadata", &staged.meta, meta)?;
        self.copy_to_array("staged block tables", &staged.tables, tables)?;
        self.copy_to_array("staged cache slots", &staged.slots, slots)?;
        self.copy_to_array("staged positions", &staged.positions, &positions)?;
        staged.positions_host = Some(positions);
        Ok(Some(CudaPaged::staged(
            plan.clone(),
            staged.meta.clone(),
            staged.tables.clone(),
            staged.slots.clone(),
        )))
    }

    /// The staged device copy of `positions` when a decode step of that many sequences staged
    /// exactly these positions, so that a capture reads the fixed buffer instead of uploading.
    pub(super) fn staged_positions(&self, positions: &[u32]) -> Option<Arc<DeviceArray<u32>>> {
        let guard = self.graphs.lock().unwrap_or_else(PoisonError::into_inner);
        let staged = guard.as_ref()?.batches.get(&positions.len())?;
        (staged.positions_host.as_deref() == Some(positions)).then(|| staged.positions.clone())
    }

    /// The staged device copy of `ids`, as [`CudaBackend::staged_positions`] for token ids.
    pub(super) fn staged_ids(&self, ids: &[u32]) -> Option<Arc<DeviceArray<u32>>> {
        let guard = self.graphs.lock().unwrap_or_else(PoisonError::into_inner);
        let staged = guard.as_ref()?.batches.get(&ids.len())?;
        (staged.ids_host.as_deref() == Some(ids)).then(|| staged.ids.clone())
    }

    /// `Backend::forward_and_sample` with graphs: `None` when this step cannot use one (graphs
    /// off, not a decode step, its plan was not staged), for the caller to run it plainly.
    pub(super) fn graph_step(
        &self,
        decode: DecodeStep<'_>,
        draws: &[TokenDraw],
        forward: &mut dyn FnMut() -> crate::Result<CudaTensor>,
    ) -> crate::Result<Option<Vec<u32>>> {
        let ids = decode.ids;
        let batch = ids.len();
        {
            let mut guard = self.graphs.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(graphs) = guard.as_mut() else {
                return Ok(None);
            };
            let action = graphs.book.step(decode.key, batch);
            // Graphs the book no longer counts as recorded (another key, outgrown tables) go.
            for (b, staged) in &mut graphs.batches {
                if !graphs.book.is_recorded(*b) {
                    staged.graph = None;
                }
            }
            if action == StepAction::Plain || draws.len() != batch {
                return Ok(None);
            }
            let Some(staged) = graphs.batches.get_mut(&batch) else {
                return Ok(None);
            };
            self.copy_to_array("staged token ids", &staged.ids, ids)?;
            staged.ids_host = Some(ids.to_vec());
            self.copy_to_array(
                "staged token draws",
                &staged.draws,
                &super::ops::draw_words(draws),
            )?;
            if action == StepAction::Replay
                && let Some(recorded) = &staged.graph
            {
                if let Err(e) = self.launch_graph(&recorded.graph) {
                    // Nothing ran (a launch fails before it starts, e.g. out of memory for the
                    // graph's own buffers): the step runs plainly, and so do this batch size's
                    // later steps.
                    staged.graph = None;
                    graphs.book.failed(batch);
                    self.give_up_graph(batch, &driver_err("launching a decode graph", e).to_string());
                    return Ok(None);
                }
                self.graph_replays.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(self.download_ids(&staged.out)?));
            }
        }
        // Record: the lock is released, since the forward pass looks up staged inputs.
        let captured = self.capture(batch, forward);
        let mut guard = self.graphs.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(graphs) = guard.as_mut() else {
            return Ok(None);
        };
        let Some(staged) = graphs.batches.get_mut(&batch) else {
            return Ok(None);
        };
        let launched = captured.and_then(|recorded| {
            self.launch_graph(&recorded.graph)
                .map_err(|e| crate::Error::Backend(driver_err("launching a decode graph", e)))?;
            Ok(recorded)
        });
        match launched {
            Ok(recorded) => {
                staged.graph = Some(recorded);
                graphs.book.recorded(batch);
                self.graph_recordings.fetch_add(1, Ordering::Relaxed);
                Ok(Some(self.download_ids(&staged.out)?))
            }
            Err(e) => {
                graphs.book.failed(batch);
                self.give_up_graph(batch, &e.to_string());
                Ok(None)
            }
        }
    }

    /// Launches `graph`; when the driver is out of memory for the graph's own buffers (they
    /// are allocated at launch), once more after the buffer cache's idle buffers are freed.
    fn launch_graph(&self, graph: &CudaGraph) -> std::result::Result<(), cudarc::driver::DriverError> {
        match graph.launch() {
            Err(e)
                if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY
                    && self.free_idle_buffers() =>
            {
                graph.launch()
            }
            other => other,
        }
    }

    fn give_up_graph(&self, batch: usize, error: &str) {
        tracing::warn!(
            batch,
            error,
            "a decode step could not be recorded or replayed as a CUDA graph; this batch size runs without one"
        );
    }

    /// Captures the forward pass and the sampling kernel of a staged decode step of `batch`
    /// sequences into a graph (nothing runs yet). The capture is always ended, so that the
    /// stream is usable again whatever failed.
    fn capture(
        &self,
        batch: usize,
        forward: &mut dyn FnMut() -> crate::Result<CudaTensor>,
    ) -> crate::Result<RecordedGraph> {
        // cudarc hands an error a drop saved to the next call that binds the context, which
        // would fail `begin_capture` (or `end_capture`, before it ends the capture) for
        // something that happened before.
        if let Err(e) = self.take_saved_error() {
            tracing::warn!(error = %e, "an earlier asynchronous GPU error, reported before a graph capture");
        }
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| driver_err("starting a graph capture", e))?;
        self.begin_capturing();
        // A panic is caught so that the capture below is ended behind it all the same (the model
        // thread survives it and answers the step's requests with an error), then resumed.
        let recorded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            forward().and_then(|logits| Ok(self.sample_into_staged(batch, &logits)?))
        }));
        // Frees that failed inside the capture (an invalidated capture fails them all) are
        // this capture's failure: taken here so that `end_capture` ends it.
        let freed = self
            .take_saved_error()
            .map_err(|e| driver_err("freeing inside a graph capture", e));
        let ended = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| driver_err("ending a graph capture", e));
        if ended.is_err() {
            self.force_end_capture();
        }
        // After the capture, so that nothing given back is freed inside it.
        let kept = self.end_capturing();
        let recorded = match recorded {
            Ok(recorded) => recorded,
            Err(panic) => {
                self.give_back_buffers(kept);
                let _ = self.take_saved_error();
                // A panic that only a capture provokes would recur at every step otherwise.
                if let Some(graphs) = self
                    .graphs
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_mut()
                {
                    graphs.book.failed(batch);
                }
                std::panic::resume_unwind(panic);
            }
        };
        let graph = recorded
            .and_then(|()| Ok(freed?))
            .and_then(|()| Ok(ended?))
            .and_then(|graph| {
                graph.ok_or_else(|| {
                    crate::Error::Backend(BackendError::Device("the graph capture recorded nothing".into()))
                })
            });
        match graph {
            Ok(graph) => Ok(RecordedGraph { graph, _kept: kept }),
            Err(e) => {
                self.give_back_buffers(kept);
                let _ = self.take_saved_error();
                Err(e)
            }
        }
    }

    /// Ends a capture `end_capture` left open, discarding its graph: the stream must not stay
    /// in capture mode, where every later op would fail.
    fn force_end_capture(&self) {
        let stream = self.stream.cu_stream();
        // SAFETY: the backend's own live stream; a graph returned here is owned by no one else
        // and destroyed at once.
        unsafe {
            if matches!(
                cudarc::driver::result::stream::is_capturing(stream),
                Ok(status) if status != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
            ) && let Ok(graph) = cudarc::driver::result::stream::end_capture(stream)
                && !graph.is_null()
            {
                let _ = cudarc::driver::result::graph::destroy(graph);
            }
        }
    }

    /// Queues `sample_rows` over `logits` with batch `batch`'s staged draws, writing its
    /// output buffer.
    fn sample_into_staged(&self, batch: usize, logits: &CudaTensor) -> Result<()> {
        let mut guard = self.graphs.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(staged) = guard.as_mut().and_then(|g| g.batches.get_mut(&batch)) else {
            return Err(BackendError::Device(format!(
                "no staged decode inputs for batch {batch}"
            )));
        };
        let BatchGraph { draws, out, .. } = staged;
        self.sample_rows_into(logits, draws, out)
    }
}
