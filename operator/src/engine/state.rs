//! The task state machine, as one pure function: [`step`] takes a task's spec and status, what
//! the caller observed about the world, and one event, and returns the new status plus what the
//! caller must do (enqueue an attempt, abandon work, delete the object, look again later).
//!
//! Exactly-once completion rests on one rule: an attempt's outcome is applied only while the
//! task is `Running` that very attempt (`status.attempts`); stale or late reports change nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use super::FailureReason;
use super::retry::backoff;
use super::template::{self, TemplateContext};
use crate::api::task::{AtomicTaskSpec, AtomicTaskStatus, DEFAULT_TIMEOUT_SECONDS, Operation, TaskPhase};

/// Template used when `spec.prompt` is not set.
pub const DEFAULT_PROMPT: &str = "{{ input.text }}";
/// Status reason of a task that lies on a dependency cycle.
pub const CYCLE_REASON: &str = "DependencyCycle";
/// Condition type set when the task finishes: `True` once it succeeded.
pub const READY_CONDITION: &str = "Ready";

/// What this operator process's dispatcher holds for the task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DispatchState {
    /// Nothing: not queued, not running (e.g. right after an operator restart).
    Idle,
    /// Waiting in the model queue.
    Queued,
    /// The given attempt is running on a worker.
    InFlight {
        /// The attempt number (as in `status.attempts`).
        attempt: u32,
    },
}

/// What the caller knows about one dependency.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DepState<'a> {
    /// No such task (yet).
    Missing,
    /// The task exists.
    Present {
        /// Its phase.
        phase: TaskPhase,
        /// Its result once succeeded (loaded from `resultRef` by the caller if stored there).
        result: Option<&'a Value>,
        /// Its status message.
        message: Option<&'a str>,
    },
}

/// Everything the caller observed before calling [`step`].
#[derive(Clone, Debug)]
pub struct Observation<'a> {
    /// The current time.
    pub now: Timestamp,
    /// One entry per `spec.dependsOn` name; absent names count as [`DepState::Missing`].
    pub deps: BTreeMap<&'a str, DepState<'a>>,
    /// The cycle path (from [`super::dag::find_cycles`]) when the task lies on one.
    pub cycle: Option<&'a [String]>,
    /// The resolved input text; `Err(message)` when the ConfigMap or Secret lookup failed.
    pub input_text: Result<Option<&'a str>, &'a str>,
    /// What the dispatcher holds for the task.
    pub dispatch: DispatchState,
    /// Whether the object has a deletionTimestamp.
    pub deleted: bool,
    /// When the task was created (`metadata.creationTimestamp`); `activeDeadlineSeconds` counts
    /// from here, falling back to `status.startTime` when unknown.
    pub created: Option<Timestamp>,
}

/// What happened to the task.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A reconcile: look at the observation and move on if anything is due.
    Observe,
    /// The dispatcher started attempt `attempt` on `worker`.
    AttemptStarted {
        /// The attempt number from [`Dispatch::attempt`].
        attempt: u32,
        /// Worker endpoint address.
        worker: String,
    },
    /// Attempt `attempt` produced a result.
    AttemptSucceeded {
        /// The attempt number.
        attempt: u32,
        /// The result.
        result: Value,
    },
    /// Attempt `attempt` failed.
    AttemptFailed {
        /// The attempt number.
        attempt: u32,
        /// Why.
        reason: FailureReason,
        /// Details for the status message.
        message: String,
    },
}

/// Work to hand to the model's dispatcher queue.
#[derive(Clone, Debug, PartialEq)]
pub struct Dispatch {
    /// The rendered prompt (or HTTP body).
    pub prompt: String,
    /// Not to be started before this time (retry backoff).
    pub not_before: Option<Timestamp>,
    /// Queue priority (`spec.priority`).
    pub priority: i32,
    /// The number this attempt will have once started.
    pub attempt: u32,
}

/// A phase change, for events and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Phase before the step.
    pub from: TaskPhase,
    /// Phase after the step.
    pub to: TaskPhase,
    /// CamelCase reason, as written to `status.reason`.
    pub reason: &'static str,
    /// Human-readable message, as written to `status.message`.
    pub message: String,
}

/// The outcome of one [`step`].
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The new status (equal to the old one when nothing changed). `observedGeneration` is
    /// left as it was; setting it is the caller's job.
    pub status: AtomicTaskStatus,
    /// An attempt to put into the model queue (replacing any queued one for this task).
    pub enqueue: Option<Dispatch>,
    /// The dispatcher must drop queued or in-flight work for this task.
    pub abandon: bool,
    /// `ttlSecondsAfterFinished` has passed: delete the object (after writing `status`).
    pub delete: bool,
    /// Reconcile again after this long: something becomes due then.
    pub requeue_after: Option<Duration>,
    /// The phase change made by this step, if any.
    pub transition: Option<Transition>,
}

/// Advances the task `name` by one event. Pure: the same inputs always give the same decision.
pub fn step(
    name: &str,
    spec: &AtomicTaskSpec,
    status: &AtomicTaskStatus,
    obs: &Observation,
    event: Event,
) -> Decision {
    let mut m = Machine {
        name,
        spec,
        obs,
        now: obs.now,
        from: status.phase,
        status: status.clone(),
        enqueue: None,
        abandon: false,
        transition: None,
    };
    m.run(event);
    let requeue_after = m.requeue_after();
    let delete = m.ttl_due().is_some_and(|due| m.now >= due);
    Decision {
        status: m.status,
        enqueue: m.enqueue,
        abandon: m.abandon,
        delete,
        requeue_after: if delete { None } else { requeue_after },
        transition: m.transition,
    }
}

/// Number of lost attempts recorded in the status.
pub fn lost_attempts(status: &AtomicTaskStatus) -> u32 {
    status.lost_attempts
}

fn upsert_condition(status: &mut AtomicTaskStatus, condition: Condition) {
    match status.conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(c) => *c = condition,
        None => status.conditions.push(condition),
    }
}

/// Status times are serialised at second precision; store them that way so a status survives
/// a round trip through the API server unchanged.
fn second(ts: Timestamp) -> Time {
    Time(Timestamp::from_second(ts.as_second()).unwrap_or(ts))
}

/// Like [`second`] but rounding up, for times before which something must not happen.
fn second_up(ts: Timestamp) -> Time {
    let up = if ts.subsec_nanosecond() > 0 {
        ts.as_second().saturating_add(1)
    } else {
        ts.as_second()
    };
    Time(Timestamp::from_second(up).unwrap_or(ts))
}

fn add(ts: Timestamp, d: Duration) -> Timestamp {
    ts.saturating_add(d).unwrap_or(Timestamp::MAX)
}

/// Time from `now` until `t`, zero when `t` has passed.
fn until(now: Timestamp, t: Timestamp) -> Duration {
    let d = now.duration_until(t);
    if d.is_positive() {
        d.unsigned_abs()
    } else {
        Duration::ZERO
    }
}

fn secs(n: u32) -> Duration {
    Duration::from_secs(u64::from(n))
}

struct Machine<'s, 'a> {
    name: &'s str,
    spec: &'s AtomicTaskSpec,
    obs: &'s Observation<'a>,
    now: Timestamp,
    from: TaskPhase,
    status: AtomicTaskStatus,
    enqueue: Option<Dispatch>,
    abandon: bool,
    transition: Option<Transition>,
}

impl Machine<'_, '_> {
    fn phase(&self) -> TaskPhase {
        self.status.phase
    }

    fn run(&mut self, event: Event) {
        if self.from.is_terminal() {
            // Late reports change nothing; a start for a finished task must be stopped.
            if matches!(event, Event::AttemptStarted { .. }) {
                self.abandon = true;
            }
            return;
        }
        if self.obs.deleted || self.spec.cancel {
            let (reason, message) = if self.obs.deleted {
                ("Deleted", "the task is being deleted".to_string())
            } else {
                ("Cancelled", "cancelled by spec.cancel".to_string())
            };
            self.finish(TaskPhase::Cancelled, reason, message);
            return;
        }
        if let Some(deadline) = self.deadline()
            && self.now >= deadline
        {
            let limit = self.spec.active_deadline_seconds.unwrap_or(0);
            self.finish(
                TaskPhase::TimedOut,
                "DeadlineExceeded",
                format!("the task took longer than activeDeadlineSeconds ({limit}s) since it was created"),
            );
            return;
        }

        let observe = matches!(event, Event::Observe);
        self.apply(event);

        match self.phase() {
            TaskPhase::Pending | TaskPhase::Blocked => self.evaluate_dependencies(),
            // After an operator restart the dispatcher has forgotten the task: queue it again.
            TaskPhase::Queued
                if self.from == TaskPhase::Queued
                    && self.enqueue.is_none()
                    && self.obs.dispatch == DispatchState::Idle =>
            {
                let not_before = self.status.next_attempt_time.as_ref().map(|t| t.0);
                if let Err((reason, message)) = self.enqueue_attempt(not_before) {
                    self.finish(TaskPhase::Failed, reason, message);
                }
            }
            TaskPhase::Running => self.check_running(observe),
            _ => {}
        }
    }

    /// Applies an attempt report if it is about the attempt the task is running right now.
    fn apply(&mut self, event: Event) {
        let running = self.phase() == TaskPhase::Running;
        let current = self.status.attempts;
        match event {
            Event::Observe => {}
            Event::AttemptStarted { attempt, worker } => {
                if self.phase() != TaskPhase::Queued || attempt != current.saturating_add(1) {
                    self.abandon = true;
                    return;
                }
                let now = second(self.now);
                self.status.attempts = attempt;
                self.status.attempt_start_time = Some(now.clone());
                self.status.start_time.get_or_insert(now);
                self.status.next_attempt_time = None;
                let message = format!("attempt {attempt} started on {worker}");
                self.status.worker = Some(worker);
                self.go(TaskPhase::Running, "AttemptStarted", message);
            }
            Event::AttemptSucceeded { attempt, result } => {
                if running && attempt == current {
                    self.status.result = Some(result);
                    self.finish(
                        TaskPhase::Succeeded,
                        "Succeeded",
                        format!("attempt {attempt} succeeded"),
                    );
                }
            }
            Event::AttemptFailed {
                attempt,
                reason,
                message,
            } => {
                if running && attempt == current {
                    self.fail_attempt(reason, message);
                }
            }
        }
    }

    /// While running: notice lost attempts (on reconcile) and attempt timeouts.
    fn check_running(&mut self, observe: bool) {
        let attempt = self.status.attempts;
        if observe && self.obs.dispatch != (DispatchState::InFlight { attempt }) {
            self.fail_attempt(
                FailureReason::Lost,
                "the operator no longer tracks it (restart or worker gone)".to_string(),
            );
            return;
        }
        if let Some(end) = self.attempt_end()
            && self.now >= end
        {
            self.fail_attempt(
                FailureReason::Timeout,
                format!("no answer within {}s", self.timeout().as_secs()),
            );
        }
    }

    /// Handles the end of the current attempt without a result: retry or give up.
    fn fail_attempt(&mut self, reason: FailureReason, message: String) {
        let attempt = self.status.attempts;
        if reason == FailureReason::Lost {
            self.status.lost_attempts = self.status.lost_attempts.saturating_add(1);
        }
        let lost = self.status.lost_attempts;
        if matches!(reason, FailureReason::Lost | FailureReason::Timeout) {
            // The worker may still be busy with it; its answer must not be waited for.
            self.abandon = true;
        }
        let policy = self.spec.retries.clone().unwrap_or_default();
        let failed = attempt.saturating_sub(lost);
        let what = format!("attempt {attempt} failed ({}): {message}", reason.as_str());
        if reason.is_retryable() && failed <= policy.limit {
            let not_before = if reason == FailureReason::Lost {
                None
            } else {
                Some(second_up(add(self.now, backoff(&policy, failed))).0)
            };
            let when = match not_before {
                Some(t) => format!("retrying at {}", Time(t).0),
                None => "retrying now".to_string(),
            };
            match self.enqueue_attempt(not_before) {
                Ok(()) => {
                    self.status.next_attempt_time = not_before.map(Time);
                    self.status.queued_time = Some(second(self.now));
                    self.go(TaskPhase::Queued, reason.as_str(), format!("{what}; {when}"));
                }
                Err((r, m)) => self.finish(TaskPhase::Failed, r, m),
            }
            return;
        }
        let why = if reason.is_retryable() {
            format!("no retries left (retries.limit is {})", policy.limit)
        } else {
            "not retryable".to_string()
        };
        let phase = if reason == FailureReason::Timeout {
            TaskPhase::TimedOut
        } else {
            TaskPhase::Failed
        };
        self.finish(phase, reason.as_str(), format!("{what}; {why}"));
    }

    /// Pending or Blocked: fail, block or queue depending on the dependencies.
    fn evaluate_dependencies(&mut self) {
        if let Some(cycle) = self.obs.cycle {
            self.finish(
                TaskPhase::Failed,
                CYCLE_REASON,
                format!("dependency cycle: {}", cycle.join(" -> ")),
            );
            return;
        }
        if let Err(e) = template::check_references(self.template(), &self.spec.depends_on) {
            self.finish(TaskPhase::Failed, "InvalidTemplate", e.to_string());
            return;
        }
        let (spec, obs) = (self.spec, self.obs);
        let mut waiting = Vec::new();
        for dep in &spec.depends_on {
            let state = obs.deps.get(dep.as_str()).copied().unwrap_or(DepState::Missing);
            match state {
                DepState::Missing => waiting.push(format!("{dep} (not found)")),
                DepState::Present { phase, message, .. } => match phase {
                    TaskPhase::Succeeded => {}
                    TaskPhase::Failed | TaskPhase::TimedOut | TaskPhase::Cancelled => {
                        let detail = message.map(|m| format!(": {m}")).unwrap_or_default();
                        self.finish(
                            TaskPhase::Failed,
                            "DependencyFailed",
                            format!("dependency {dep} ended {}{detail}", phase.as_str()),
                        );
                        return;
                    }
                    other => waiting.push(format!("{dep} ({})", other.as_str())),
                },
            }
        }
        if !waiting.is_empty() {
            let message = format!("waiting for dependencies: {}", waiting.join(", "));
            if self.phase() == TaskPhase::Blocked {
                self.status.reason = Some("WaitingForDependencies".to_string());
                self.status.message = Some(message);
            } else {
                self.go(TaskPhase::Blocked, "WaitingForDependencies", message);
            }
            return;
        }
        match self.enqueue_attempt(None) {
            Ok(()) => {
                self.status.queued_time = Some(second(self.now));
                self.status.next_attempt_time = None;
                let model = self.spec.model.as_deref().unwrap_or("http");
                self.go(
                    TaskPhase::Queued,
                    "Queued",
                    format!("waiting for a worker of {model}"),
                );
            }
            Err((reason, message)) => self.finish(TaskPhase::Failed, reason, message),
        }
    }

    /// The template of what is sent: `http.body` for http tasks, `prompt` otherwise.
    fn template(&self) -> &str {
        if self.spec.operation == Operation::Http {
            self.spec
                .http
                .as_ref()
                .and_then(|h| h.body.as_deref())
                .unwrap_or("")
        } else {
            self.spec.prompt.as_deref().unwrap_or(DEFAULT_PROMPT)
        }
    }

    /// Renders the prompt and sets `enqueue` for the next attempt.
    fn enqueue_attempt(&mut self, not_before: Option<Timestamp>) -> Result<(), (&'static str, String)> {
        let input = self
            .obs
            .input_text
            .map_err(|e| ("InputUnavailable", format!("input of {}: {e}", self.name)))?;
        let tasks: BTreeMap<String, Value> = self
            .obs
            .deps
            .iter()
            .filter_map(|(name, dep)| match dep {
                DepState::Present {
                    phase: TaskPhase::Succeeded,
                    result: Some(r),
                    ..
                } => Some((name.to_string(), (*r).clone())),
                _ => None,
            })
            .collect();
        let ctx = TemplateContext {
            input_text: input,
            tasks: &tasks,
        };
        let prompt = template::render(self.template(), &ctx).map_err(|e| ("TemplateError", e.to_string()))?;
        self.enqueue = Some(Dispatch {
            prompt,
            not_before,
            priority: self.spec.priority,
            attempt: self.status.attempts.saturating_add(1),
        });
        Ok(())
    }

    /// Records a phase change.
    fn go(&mut self, to: TaskPhase, reason: &'static str, message: String) {
        self.status.phase = to;
        self.status.reason = Some(reason.to_string());
        self.status.message = Some(message.clone());
        self.transition = Some(Transition {
            from: self.from,
            to,
            reason,
            message,
        });
    }

    /// Moves into a terminal phase.
    fn finish(&mut self, to: TaskPhase, reason: &'static str, message: String) {
        self.status.completion_time = Some(second(self.now));
        self.status.next_attempt_time = None;
        self.enqueue = None;
        // Whatever the dispatcher still holds for this task is no longer wanted.
        self.abandon = true;
        upsert_condition(
            &mut self.status,
            Condition {
                type_: READY_CONDITION.to_string(),
                status: if to == TaskPhase::Succeeded {
                    "True"
                } else {
                    "False"
                }
                .to_string(),
                reason: reason.to_string(),
                message: message.clone(),
                last_transition_time: second(self.now),
                observed_generation: None,
            },
        );
        self.go(to, reason, message);
    }

    fn timeout(&self) -> Duration {
        secs(self.spec.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS))
    }

    /// When the active deadline passes (counted from creation, or the first attempt when the
    /// creation time is unknown).
    fn deadline(&self) -> Option<Timestamp> {
        let start = self
            .obs
            .created
            .or_else(|| self.status.start_time.as_ref().map(|t| t.0))?;
        Some(add(start, secs(self.spec.active_deadline_seconds?)))
    }

    /// When the running attempt times out.
    fn attempt_end(&self) -> Option<Timestamp> {
        Some(add(self.status.attempt_start_time.as_ref()?.0, self.timeout()))
    }

    /// When a finished task is to be deleted.
    fn ttl_due(&self) -> Option<Timestamp> {
        if !self.phase().is_terminal() {
            return None;
        }
        let done = self.status.completion_time.as_ref()?.0;
        Some(add(done, secs(self.spec.ttl_seconds_after_finished?)))
    }

    /// The earliest time something becomes due in the resulting state.
    fn requeue_after(&self) -> Option<Duration> {
        let phase = self.phase();
        if phase.is_terminal() {
            return self.ttl_due().map(|t| until(self.now, t));
        }
        let mut due = vec![self.deadline()];
        match phase {
            TaskPhase::Running => due.push(self.attempt_end()),
            TaskPhase::Queued => due.push(self.status.next_attempt_time.as_ref().map(|t| t.0)),
            _ => {}
        }
        due.into_iter().flatten().min().map(|t| until(self.now, t))
    }
}

#[cfg(test)]
mod tests;
