//! The batching scheduler: one thread owns the model and runs forward passes; request handlers
//! send it their encodings over a channel and await a oneshot reply.
//!
//! Batches are formed per sequence, not per request, under a token budget counted as the model
//! pays it: sequences × longest sequence (everything is padded to the longest). Sequences are
//! taken first-come first-served from the requests waiting for the same kind of work, so a large
//! request is spread over several batches and small requests ride along with others. A batch
//! always holds at least one sequence, so a sequence longer than the budget still runs (alone).
//! A batch that runs out of device memory runs again in halves ([`split`]); only a request
//! with a sequence that runs out of memory alone fails (503 `out_of_memory`).
//!
//! [`split`]: super::split

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::fault::DeviceFault;
use super::metrics::Metrics;
use super::split::{Failure, PieceLimit};
use crate::backend::Backend;
use crate::config::PoolingConfig;
use crate::models::bert::{Batch, Bert};
use crate::tokenizer::Encoding;

/// What to compute for each sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// A pooled sentence embedding.
    Embed,
    /// Sequence classification logits.
    SequenceLogits,
    /// Per-token classification logits.
    TokenLogits,
}

/// The result for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// An embedding or a row of sequence logits.
    Vector(Vec<f32>),
    /// One row of logits per real token.
    Tokens(Vec<Vec<f32>>),
}

/// A model that runs a batch of encodings. This is where encoders plug into the scheduler; tests
/// wrap one to slow it down.
pub trait Encoder: Send {
    /// Runs `work` on `encodings` (one batch), giving one output per encoding, in order.
    fn run(&self, work: Work, encodings: &[Encoding]) -> crate::Result<Vec<Output>>;

    /// The device's counts for the metrics (`Backend::device_stats`).
    fn device_stats(&self) -> Option<crate::backend::DeviceStats> {
        None
    }
}

/// A BERT-family encoder on backend `B`.
pub struct BertEncoder<B: Backend> {
    /// The model.
    pub model: Bert<B>,
    /// The backend it runs on.
    pub backend: B,
    /// Sentence-embedding pooling.
    pub pooling: PoolingConfig,
}

impl<B: Backend> Encoder for BertEncoder<B> {
    fn run(&self, work: Work, encodings: &[Encoding]) -> crate::Result<Vec<Output>> {
        let batch = Batch::new(encodings);
        Ok(match work {
            Work::Embed => self
                .model
                .embed(&self.backend, &batch, &self.pooling)?
                .into_iter()
                .map(Output::Vector)
                .collect(),
            Work::SequenceLogits => self
                .model
                .sequence_logits(&self.backend, &batch)?
                .into_iter()
                .map(Output::Vector)
                .collect(),
            Work::TokenLogits => self
                .model
                .token_logits(&self.backend, &batch)?
                .into_iter()
                .map(Output::Tokens)
                .collect(),
        })
    }

    fn device_stats(&self) -> Option<crate::backend::DeviceStats> {
        self.backend.device_stats()
    }
}

/// Why the scheduler could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The scheduler thread has stopped.
    #[error("the scheduler has stopped")]
    Stopped,
    /// The model failed on a batch holding this request.
    #[error("{0}")]
    Model(String),
    /// The device ran out of memory on a batch holding this request (it stays usable).
    #[error("{0}")]
    OutOfMemory(String),
}

impl ScheduleError {
    /// What a failed forward pass tells the requests of its batch.
    fn of_pass(error: &crate::Error) -> Self {
        if error.is_out_of_memory() {
            Self::OutOfMemory(error.to_string())
        } else {
            Self::Model(error.to_string())
        }
    }
}

type Reply = oneshot::Sender<Result<Vec<Output>, ScheduleError>>;

struct Job {
    work: Work,
    encodings: Vec<Encoding>,
    outputs: Vec<Output>,
    reply: Option<Reply>,
    enqueued: Instant,
    started: bool,
}

/// The handle request handlers use to submit work. Dropping every handle stops the thread once
/// the work already sent is done.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::Sender<Job>,
}

impl Scheduler {
    /// Starts the scheduler thread, which owns `encoder` and records a device failure in
    /// `fault`.
    pub fn start(
        encoder: Box<dyn Encoder>,
        max_batch_tokens: usize,
        fault: DeviceFault,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("scheduler".to_owned())
            .spawn(move || run(encoder.as_ref(), rx, max_batch_tokens.max(1), &fault, &metrics))?;
        Ok(Self { tx })
    }

    /// Runs `work` on `encodings`, batched with whatever else is waiting; one output per
    /// encoding, in order.
    pub async fn submit(&self, work: Work, encodings: Vec<Encoding>) -> Result<Vec<Output>, ScheduleError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            work,
            outputs: Vec::with_capacity(encodings.len()),
            encodings,
            reply: Some(reply),
            enqueued: Instant::now(),
            started: false,
        };
        self.tx.send(job).map_err(|_| ScheduleError::Stopped)?;
        rx.await.map_err(|_| ScheduleError::Stopped)?
    }
}

fn pending(queue: &VecDeque<Job>) -> i64 {
    queue
        .iter()
        .map(|j| (j.encodings.len() - j.outputs.len()) as i64)
        .sum()
}

fn run(
    encoder: &dyn Encoder,
    rx: mpsc::Receiver<Job>,
    budget: usize,
    fault: &DeviceFault,
    metrics: &Metrics,
) {
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut limit = PieceLimit::new();
    loop {
        if queue.is_empty() {
            match rx.recv() {
                Ok(job) => queue.push_back(job),
                Err(_) => return,
            }
        }
        while let Ok(job) = rx.try_recv() {
            queue.push_back(job);
        }
        // Requests whose caller has gone (client disconnected) are not worth running.
        queue.retain(|j| j.reply.as_ref().is_some_and(|r| !r.is_closed()));
        finish_done(&mut queue);
        metrics.queue_size.set(pending(&queue));
        let Some(first) = queue.front() else { continue };
        let work = first.work;

        // Take sequences under the budget: (job index, first, end) per job.
        let mut picks: Vec<(usize, usize, usize)> = Vec::new();
        let mut batch: Vec<Encoding> = Vec::new();
        let mut longest = 0;
        'jobs: for (j, job) in queue.iter_mut().enumerate() {
            if job.work != work {
                continue;
            }
            let start = job.outputs.len();
            let mut end = start;
            let mut full = false;
            while end < job.encodings.len() {
                let len = job.encodings[end].ids.len();
                let new_longest = longest.max(len);
                if !batch.is_empty() && (batch.len() + 1) * new_longest > budget {
                    full = true;
                    break;
                }
                longest = new_longest;
                batch.push(job.encodings[end].clone());
                end += 1;
            }
            if end > start {
                picks.push((j, start, end));
                if !job.started {
                    job.started = true;
                    metrics.observe_stage("queue", job.enqueued.elapsed().as_secs_f64());
                }
            }
            if full {
                break 'jobs;
            }
        }

        let started = Instant::now();
        let outcome = limit.run(
            batch.len(),
            |piece| padded_tokens(&batch[piece]),
            |piece| {
                fault.run_pass(
                    || encoder.run(work, &batch[piece]),
                    ScheduleError::of_pass,
                    || ScheduleError::Model("the model panicked on this batch".to_owned()),
                )
            },
            |got, want| ScheduleError::Model(format!("the model gave {got} outputs for {want} inputs")),
        );
        metrics.observe_stage("forward", started.elapsed().as_secs_f64());
        if let Some(stats) = encoder.device_stats() {
            metrics.record_device(&stats);
        }
        metrics.record_pieces("encode", &outcome.ran, outcome.splits, limit.most());
        // A job with a sequence that failed gets that sequence's error; the others their outputs.
        let mut results = outcome.results.into_iter();
        for (j, start, end) in picks {
            for result in results.by_ref().take(end - start) {
                let job = &mut queue[j];
                match result {
                    Ok(output) => job.outputs.push(output),
                    Err(Failure::OutOfMemory(error) | Failure::Failed(error)) => {
                        if let Some(reply) = job.reply.take() {
                            tracing::error!(%error, "forward pass failed");
                            let _ = reply.send(Err(error));
                        }
                    }
                }
            }
        }
        finish_done(&mut queue);
        metrics.queue_size.set(pending(&queue));
    }
}

/// What a batch of `encodings` costs the model: every sequence padded to the longest.
fn padded_tokens(encodings: &[Encoding]) -> usize {
    encodings.len() * encodings.iter().map(|e| e.ids.len()).max().unwrap_or(0)
}

/// Answers the jobs that have all their outputs and drops those already answered.
fn finish_done(queue: &mut VecDeque<Job>) {
    for job in queue.iter_mut() {
        if job.outputs.len() == job.encodings.len()
            && let Some(reply) = job.reply.take()
        {
            let _ = reply.send(Ok(std::mem::take(&mut job.outputs)));
        }
    }
    queue.retain(|j| j.reply.is_some());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendError;
    use std::sync::Mutex;

    /// Echoes each sequence's length and records the batch sizes it saw.
    struct Echo(Arc<Mutex<Vec<usize>>>);

    impl Encoder for Echo {
        fn run(&self, _: Work, encodings: &[Encoding]) -> crate::Result<Vec<Output>> {
            if let Ok(mut seen) = self.0.lock() {
                seen.push(encodings.len());
            }
            Ok(encodings
                .iter()
                .map(|e| Output::Vector(vec![e.ids.len() as f32]))
                .collect())
        }
    }

    fn enc(len: usize) -> Encoding {
        Encoding {
            ids: vec![1; len],
            type_ids: vec![0; len],
            offsets: vec![(0, 0); len],
            special_tokens_mask: vec![false; len],
        }
    }

    #[tokio::test]
    async fn splits_a_large_request_under_the_budget_and_keeps_order() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let metrics = Arc::new(Metrics::new().unwrap());
        let s = Scheduler::start(Box::new(Echo(seen.clone())), 40, DeviceFault::new(), metrics).unwrap();
        let lens: Vec<usize> = (1..=10).collect();
        let out = s
            .submit(Work::Embed, lens.iter().map(|&n| enc(n)).collect())
            .await
            .unwrap();
        let got: Vec<_> = out
            .iter()
            .map(|o| match o {
                Output::Vector(v) => v[0] as usize,
                Output::Tokens(_) => 0,
            })
            .collect();
        assert_eq!(got, lens);
        let seen = seen.lock().unwrap().clone();
        assert!(seen.len() > 1, "{seen:?}");
        assert_eq!(seen.iter().sum::<usize>(), 10);
        let empty = s.submit(Work::Embed, vec![]).await.unwrap();
        assert!(empty.is_empty());
    }

    struct Failing;

    impl Encoder for Failing {
        fn run(&self, _: Work, _: &[Encoding]) -> crate::Result<Vec<Output>> {
            Err(crate::Error::Input("boom".to_owned()))
        }
    }

    #[tokio::test]
    async fn model_errors_reach_the_caller() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let s = Scheduler::start(Box::new(Failing), 100, DeviceFault::new(), metrics).unwrap();
        let err = s.submit(Work::Embed, vec![enc(3)]).await.unwrap_err();
        assert_eq!(err, ScheduleError::Model("boom".to_owned()));
    }

    /// Runs out of device memory on batches of more tokens than its limit, echoes smaller ones.
    struct SmallDevice(usize);

    impl Encoder for SmallDevice {
        fn run(&self, work: Work, encodings: &[Encoding]) -> crate::Result<Vec<Output>> {
            let tokens: usize = encodings.iter().map(|e| e.ids.len()).sum();
            if tokens > self.0 {
                return Err(crate::Error::Backend(BackendError::OutOfMemory(format!(
                    "allocating {tokens} tokens' activations: out of GPU memory"
                ))));
            }
            Echo(Arc::new(Mutex::new(Vec::new()))).run(work, encodings)
        }
    }

    /// A batch the device cannot hold runs in halves and every request gets its outputs; only a
    /// sequence that runs out of memory alone fails its request, and the device stays usable.
    #[tokio::test]
    async fn a_batch_out_of_device_memory_runs_in_halves_and_only_a_sequence_too_large_alone_fails() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let fault = DeviceFault::new();
        let s = Scheduler::start(Box::new(SmallDevice(8)), 100, fault.clone(), metrics.clone()).unwrap();
        let out = s.submit(Work::Embed, vec![enc(5), enc(3), enc(5)]).await.unwrap();
        assert_eq!(
            out,
            vec![
                Output::Vector(vec![5.0]),
                Output::Vector(vec![3.0]),
                Output::Vector(vec![5.0])
            ]
        );
        let text = metrics.render().unwrap();
        assert!(
            text.contains("atomic_worker_out_of_memory_splits_total{pass=\"encode\"} 1"),
            "13 tokens split once, into 5 and 3 + 5:\n{text}"
        );
        let err = s.submit(Work::Embed, vec![enc(3), enc(9)]).await.unwrap_err();
        assert_eq!(
            err,
            ScheduleError::OutOfMemory(
                "backend: out of device memory: allocating 9 tokens' activations: out of GPU memory"
                    .to_owned()
            )
        );
        assert_eq!(fault.get(), None, "out of memory is not a device failure");
        let out = s.submit(Work::Embed, vec![enc(5)]).await.unwrap();
        assert_eq!(out, vec![Output::Vector(vec![5.0])]);
    }
}
