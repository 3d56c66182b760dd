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
use std::sync::{Arc, PoisonError};

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, DevicePtr, DeviceRepr};

use super::context::{CudaBackend, driver_err};
use super::paged::CudaPaged;
use super::tensor::CudaTensor;
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
    ids: Arc<CudaSlice<u32>>,
    /// What `ids` holds (`None` until the first step's ids are staged).
    ids_host: Option<Vec<u32>>,
    positions: Arc<CudaSlice<u32>>,
    positions_host: Option<Vec<u32>>,
    meta: Arc<CudaSlice<i32>>,
    tables: Arc<CudaSlice<u32>>,
    slots: Arc<CudaSlice<u32>>,
    /// Four doubles per sequence, as `sample_rows` reads them.
    draws: CudaSlice<f64>,
    out: CudaSlice<u32>,
    graph: Option<RecordedGraph>,
}

/// A graph recorded from the backend's stream.
struct RecordedGraph(CudaGraph);

// SAFETY: a graph's handles may be used from any thread as long as calls on them are
// serialised (the driver's rule for graph objects); this one is only touched while the backend's
// `graphs` mutex is held.
unsafe impl Send for RecordedGraph {}

impl BatchGraph {
    fn new(backend: &CudaBackend, batch: usize, table_entries: usize) -> Result<Self> {
        Ok(Self {
            ids: Arc::new(backend.alloc_slice("graph token ids", batch)?),
            ids_host: None,
            positions: Arc::new(backend.alloc_slice("graph positions", batch)?),
            positions_host: None,
            meta: Arc::new(backend.alloc_slice("graph block table metadata", 4 * batch)?),
            tables: Arc::new(backend.alloc_slice("graph block tables", table_entries)?),
            slots: Arc::new(backend.alloc_slice("graph cache slots", batch)?),
            draws: backend.alloc_slice("graph draws", 4 * batch)?,
            out: backend.alloc_slice("graph token choices", batch)?,
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
                    graphs.book.forget(batch);
                    return Err(e);
                }
            }
        }
        let Some(staged) = graphs.batches.get_mut(&batch) else {
            graphs.book.failed(batch);
            return Ok(None);
        };
        if grow_tables {
            staged.graph = None; // it reads the old buffer
            staged.tables = Arc::new(self.alloc_slice("graph block tables", table_capacity)?);
        }
        let positions: Vec<u32> = plan
            .seqs
            .iter()
            .map(|s| u32::try_from(s.k_len - 1).unwrap_or(u32::MAX))
            .collect();
        self.write_staged("block table metadata", &staged.meta, meta)?;
        self.write_staged("block tables", &staged.tables, tables)?;
        self.write_staged("cache slots", &staged.slots, slots)?;
        self.write_staged("positions", &staged.positions, &positions)?;
        staged.positions_host = Some(positions);
        Ok(Some(CudaPaged::staged(
            plan.clone(),
            staged.meta.clone(),
            staged.tables.clone(),
            staged.slots.clone(),
        )))
    }

    /// The staged device copy of `values` when a decode step of that many sequences staged
    /// exactly these positions (`positions`) or these as its token ids or positions
    /// (`ids_or_positions`: GPT-2 looks its position embeddings up by position), so that a
    /// capture reads the fixed buffer instead of uploading.
    pub(super) fn staged_positions(&self, values: &[u32]) -> Option<Arc<CudaSlice<u32>>> {
        self.staged(values, false)
    }

    /// See [`CudaBackend::staged_positions`].
    pub(super) fn staged_ids_or_positions(&self, values: &[u32]) -> Option<Arc<CudaSlice<u32>>> {
        self.staged(values, true)
    }

    fn staged(&self, values: &[u32], ids_too: bool) -> Option<Arc<CudaSlice<u32>>> {
        let guard = self.graphs.lock().unwrap_or_else(PoisonError::into_inner);
        let staged = guard.as_ref()?.batches.get(&values.len())?;
        if ids_too && staged.ids_host.as_deref() == Some(values) {
            return Some(staged.ids.clone());
        }
        (staged.positions_host.as_deref() == Some(values)).then(|| staged.positions.clone())
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
            self.write_staged("token ids", &staged.ids, ids)?;
            staged.ids_host = Some(ids.to_vec());
            self.write_staged("token draws", &staged.draws, &super::ops::draw_words(draws))?;
            if action == StepAction::Replay
                && let Some(graph) = &staged.graph
            {
                graph
                    .0
                    .launch()
                    .map_err(|e| driver_err("launching a decode graph", e))?;
                return Ok(Some(self.download_ids(&staged.out)?));
            }
        }
        // Record: the lock is released, since the forward pass looks up staged inputs.
        match self.capture(batch, forward) {
            Ok(graph) => {
                let mut guard = self.graphs.lock().unwrap_or_else(PoisonError::into_inner);
                let Some(graphs) = guard.as_mut() else {
                    return Ok(None);
                };
                let Some(staged) = graphs.batches.get_mut(&batch) else {
                    return Ok(None);
                };
                graph
                    .launch()
                    .map_err(|e| driver_err("launching a decode graph", e))?;
                staged.graph = Some(RecordedGraph(graph));
                graphs.book.recorded(batch);
                Ok(Some(self.download_ids(&staged.out)?))
            }
            Err(e) => {
                tracing::warn!(
                    batch,
                    error = %e,
                    "a decode step could not be recorded as a CUDA graph; this batch size runs without one"
                );
                if let Some(graphs) = self
                    .graphs
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_mut()
                {
                    graphs.book.failed(batch);
                }
                Ok(None)
            }
        }
    }

    /// Captures the forward pass and the sampling kernel of a staged decode step of `batch`
    /// sequences into a graph (nothing runs yet). The capture is always ended, so that the
    /// stream is usable again whatever failed.
    fn capture(
        &self,
        batch: usize,
        forward: &mut dyn FnMut() -> crate::Result<CudaTensor>,
    ) -> crate::Result<CudaGraph> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| driver_err("starting a graph capture", e))?;
        self.set_capturing(true);
        let recorded = forward().and_then(|logits| Ok(self.sample_into_staged(batch, &logits)?));
        self.set_capturing(false);
        let ended = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| driver_err("ending a graph capture", e));
        // Frees queued inside a failed capture are reported by the next driver call; this
        // capture's failure is reported below instead.
        if recorded.is_err() || ended.is_err() {
            let _ = self.bind();
        }
        recorded?;
        ended?.ok_or_else(|| {
            crate::Error::Backend(BackendError::Device("the graph capture recorded nothing".into()))
        })
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

    /// A device buffer of `len` elements, its contents undefined until written.
    pub(super) fn alloc_slice<T: DeviceRepr>(&self, what: &str, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every staged buffer is written before a kernel reads it.
        unsafe { self.stream.alloc::<T>(len.max(1)) }
            .map_err(|e| driver_err(&format!("allocating {what}"), e))
    }

    /// Copies `src` into the start of `dst`, in stream order: after every kernel queued before
    /// that reads `dst`, before every kernel queued after.
    fn write_staged<T: DeviceRepr>(&self, what: &str, dst: &CudaSlice<T>, src: &[T]) -> Result<()> {
        if src.len() > dst.len() {
            return Err(BackendError::Device(format!(
                "staging {what}: {} values for a buffer of {}",
                src.len(),
                dst.len()
            )));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let (ptr, _sync) = dst.device_ptr(&self.stream);
        // SAFETY: `dst` is a live allocation of at least `src.len()` elements; the copy is queued
        // on the backend's one stream, which orders it against every kernel that uses `dst`; a
        // copy from pageable host memory has read `src` by the time it returns.
        unsafe { cudarc::driver::result::memcpy_htod_async(ptr, src, self.stream.cu_stream()) }
            .map_err(|e| driver_err(&format!("staging {what}"), e))
    }
}
