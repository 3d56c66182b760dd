//! The worker's Prometheus metrics, in a registry of their own (one per server, so servers in
//! one process, as in tests, do not share counters).

use std::sync::{Arc, Mutex, PoisonError};

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::backend::DeviceStats;

/// All metrics of one server.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Sequences waiting in the scheduler (not yet run).
    pub queue_size: IntGauge,
    /// Requests being handled.
    pub in_flight: IntGauge,
    /// Key/value cache positions reserved by the running sequences (decoders).
    pub kv_cache_reserved: IntGauge,
    /// Key/value cache positions the decoder's pool holds (its capacity, fixed at load).
    pub kv_cache_capacity: IntGauge,
    /// Sequences per forward pass.
    pub batch_size: Histogram,
    /// Padded tokens (batch × longest) per forward pass.
    pub batch_tokens: Histogram,
    /// Seconds spent per stage: `tokenize`, `queue`, `forward`.
    pub stage_seconds: HistogramVec,
    /// Requests by endpoint.
    pub requests: IntCounterVec,
    /// Failed requests by endpoint and reason (the error code).
    pub failures: IntCounterVec,
    /// Seconds each start-up phase took (what a worker scaled up from zero waits for).
    pub startup_seconds: GaugeVec,
    /// GPU device allocations by outcome (`reused` a cached buffer, `missed`: the driver).
    gpu_buffer_requests: IntCounterVec,
    /// Idle device memory the GPU's buffer cache holds.
    gpu_idle_buffer_bytes: IntGauge,
    /// Decode steps run from CUDA graphs by outcome (`replayed`, `recorded`).
    decode_graph_steps: IntCounterVec,
    /// Passes that ran out of device memory and ran again in halves, by model thread.
    out_of_memory_splits: IntCounterVec,
    /// The device's counts at the last [`Metrics::record_device`], which the counters above
    /// have reached (the device counts from its start; the counters add the difference).
    device_seen: Arc<Mutex<DeviceStats>>,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let queue_size = IntGauge::new("atomic_worker_queue_size", "Sequences waiting for a forward pass")?;
        let in_flight = IntGauge::new("atomic_worker_requests_in_flight", "Requests being handled")?;
        let kv_cache_reserved = IntGauge::new(
            "atomic_worker_kv_cache_reserved_positions",
            "Key/value cache positions reserved by the running sequences",
        )?;
        let kv_cache_capacity = IntGauge::new(
            "atomic_worker_kv_cache_capacity_positions",
            "Key/value cache positions the decoder's pool holds",
        )?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("atomic_worker_batch_size", "Sequences per forward pass")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]),
        )?;
        let batch_tokens = Histogram::with_opts(
            HistogramOpts::new(
                "atomic_worker_batch_tokens",
                "Padded tokens (sequences times longest) per forward pass",
            )
            .buckets(prometheus::exponential_buckets(16.0, 2.0, 12)?),
        )?;
        let stage_seconds = HistogramVec::new(
            HistogramOpts::new(
                "atomic_worker_stage_duration_seconds",
                "Seconds per request stage (tokenize, queue) or per batch (forward)",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16)?),
            &["stage"],
        )?;
        let requests = IntCounterVec::new(
            Opts::new("atomic_worker_requests_total", "Requests by endpoint"),
            &["endpoint"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "atomic_worker_request_failures_total",
                "Failed requests by endpoint and reason",
            ),
            &["endpoint", "reason"],
        )?;
        let startup_seconds = GaugeVec::new(
            Opts::new(
                "atomic_worker_startup_seconds",
                "Seconds each start-up phase took: kernels (GPU kernel build), selftest, load (weights \
                 onto the device), warmup (the largest pass, GPU), ready (from process start)",
            ),
            &["phase"],
        )?;
        registry.register(Box::new(queue_size.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(kv_cache_reserved.clone()))?;
        registry.register(Box::new(kv_cache_capacity.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(batch_tokens.clone()))?;
        registry.register(Box::new(stage_seconds.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(startup_seconds.clone()))?;
        let gpu_buffer_requests = IntCounterVec::new(
            Opts::new(
                "atomic_worker_gpu_buffer_requests_total",
                "GPU device allocations by outcome: reused (a buffer of the buffer cache) or missed \
                 (asked of the driver); none on the CPU",
            ),
            &["outcome"],
        )?;
        let gpu_idle_buffer_bytes = IntGauge::new(
            "atomic_worker_gpu_idle_buffer_bytes",
            "Idle device memory the GPU's buffer cache holds for reuse",
        )?;
        let decode_graph_steps = IntCounterVec::new(
            Opts::new(
                "atomic_worker_decode_graph_steps_total",
                "Decode steps run from CUDA graphs (--cuda-graph-max-batch) by outcome: replayed or recorded",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(gpu_buffer_requests.clone()))?;
        registry.register(Box::new(gpu_idle_buffer_bytes.clone()))?;
        let out_of_memory_splits = IntCounterVec::new(
            Opts::new(
                "atomic_worker_out_of_memory_splits_total",
                "Passes that ran out of device memory and ran again as two halves, by pass: encode \
                 (a batch of encodings) or decode (a generation step)",
            ),
            &["pass"],
        )?;
        registry.register(Box::new(decode_graph_steps.clone()))?;
        registry.register(Box::new(out_of_memory_splits.clone()))?;
        Ok(Self {
            registry,
            queue_size,
            in_flight,
            kv_cache_reserved,
            kv_cache_capacity,
            batch_size,
            batch_tokens,
            stage_seconds,
            requests,
            failures,
            startup_seconds,
            gpu_buffer_requests,
            gpu_idle_buffer_bytes,
            decode_graph_steps,
            out_of_memory_splits,
            device_seen: Arc::new(Mutex::new(DeviceStats::default())),
        })
    }

    /// Brings the GPU metrics up to `stats`, the device's counts since it opened (the model
    /// threads call it after each pass).
    pub fn record_device(&self, stats: &DeviceStats) {
        let mut seen = self.device_seen.lock().unwrap_or_else(PoisonError::into_inner);
        let add = |counter: &IntCounterVec, outcome: &str, now: u64, before: u64| {
            counter
                .with_label_values(&[outcome])
                .inc_by(now.saturating_sub(before));
        };
        add(
            &self.gpu_buffer_requests,
            "reused",
            stats.buffers.reused,
            seen.buffers.reused,
        );
        add(
            &self.gpu_buffer_requests,
            "missed",
            stats.buffers.missed,
            seen.buffers.missed,
        );
        add(
            &self.decode_graph_steps,
            "replayed",
            stats.graph_replays,
            seen.graph_replays,
        );
        add(
            &self.decode_graph_steps,
            "recorded",
            stats.graph_recordings,
            seen.graph_recordings,
        );
        self.gpu_idle_buffer_bytes
            .set(i64::try_from(stats.buffers.idle_bytes).unwrap_or(i64::MAX));
        *seen = *stats;
    }

    /// Records what a batch of `pass` (`encode`, `decode`) ran: the pieces that ran (sequences
    /// and tokens each, as forward passes), and the pieces that ran out of device memory and
    /// were split in two, with a warning naming the limit now on a piece's tokens.
    pub fn record_pieces(&self, pass: &str, ran: &[(usize, usize)], splits: usize, limit: Option<usize>) {
        for &(sequences, tokens) in ran {
            self.batch_size.observe(sequences as f64);
            self.batch_tokens.observe(tokens as f64);
        }
        if splits > 0 {
            self.out_of_memory_splits
                .with_label_values(&[pass])
                .inc_by(splits as u64);
            tracing::warn!(
                pass,
                splits,
                token_limit = ?limit,
                "a batch ran out of device memory; it ran in smaller pieces"
            );
        }
    }

    /// Records how long a start-up phase took.
    pub fn record_startup(&self, phase: &str, seconds: f64) {
        self.startup_seconds.with_label_values(&[phase]).set(seconds);
    }

    /// Records how long a stage took.
    pub fn observe_stage(&self, stage: &str, seconds: f64) {
        self.stage_seconds.with_label_values(&[stage]).observe(seconds);
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> Result<String, String> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .map_err(|e| e.to_string())?;
        String::from_utf8(out).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::buffer_cache::BufferStats;

    #[test]
    fn device_counts_become_counters_that_add_only_what_is_new() {
        let m = Metrics::new().expect("metrics");
        let mut stats = DeviceStats {
            buffers: BufferStats {
                reused: 10,
                missed: 3,
                idle_bytes: 4096,
                ..BufferStats::default()
            },
            graph_replays: 0,
            graph_recordings: 1,
        };
        m.record_device(&stats);
        stats.buffers.reused = 25;
        stats.graph_replays = 7;
        stats.buffers.idle_bytes = 512;
        m.record_device(&stats);
        m.record_device(&stats); // nothing new
        let text = m.render().expect("render");
        for line in [
            "atomic_worker_gpu_buffer_requests_total{outcome=\"reused\"} 25",
            "atomic_worker_gpu_buffer_requests_total{outcome=\"missed\"} 3",
            "atomic_worker_decode_graph_steps_total{outcome=\"replayed\"} 7",
            "atomic_worker_decode_graph_steps_total{outcome=\"recorded\"} 1",
            "atomic_worker_gpu_idle_buffer_bytes 512",
        ] {
            assert!(text.contains(line), "no `{line}` in:\n{text}");
        }
    }

    #[test]
    fn start_up_phases_render_by_name() {
        let m = Metrics::new().expect("metrics");
        m.record_startup("kernels", 1.25);
        m.record_startup("selftest", 0.5);
        m.record_startup("kernels", 0.001); // a phase set again keeps its last value
        let text = m.render().expect("render");
        assert!(
            text.contains("atomic_worker_startup_seconds{phase=\"kernels\"} 0.001"),
            "{text}"
        );
        assert!(
            text.contains("atomic_worker_startup_seconds{phase=\"selftest\"} 0.5"),
            "{text}"
        );
    }
}
