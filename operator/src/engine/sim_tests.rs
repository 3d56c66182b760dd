//! Property tests of the engine as a whole: a tiny in-memory simulator runs random task graphs
//! through [`step`] and a [`ModelQueue`] under random event orders, clock jumps, worker
//! outcomes and operator restarts, and checks the invariants the operator promises.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use proptest::prelude::*;
use serde_json::json;

use super::FailureReason;
use super::dag::find_cycles;
use super::queue::ModelQueue;
use super::state::{Decision, DepState, DispatchState, Event, Observation, lost_attempts, step};
use crate::api::task::{AtomicTaskSpec, AtomicTaskStatus, RetryPolicy, TaskInput, TaskPhase};

#[derive(Clone, Debug)]
struct TaskCfg {
    limit: u32,
    backoff: u32,
    timeout: u32,
    priority: i32,
    cancel: bool,
    deadline: Option<u32>,
}

fn task_cfg() -> impl Strategy<Value = TaskCfg> {
    (
        0u32..3,
        0u32..5,
        5u32..30,
        -3i32..3,
        prop::bool::weighted(0.1),
        prop::option::weighted(0.2, 30u32..200),
    )
        .prop_map(|(limit, backoff, timeout, priority, cancel, deadline)| TaskCfg {
            limit,
            backoff,
            timeout,
            priority,
            cancel,
            deadline,
        })
}

struct Sim {
    names: Vec<String>,
    specs: Vec<AtomicTaskSpec>,
    statuses: Vec<AtomicTaskStatus>,
    dispatch: Vec<DispatchState>,
    cycles: BTreeMap<String, Vec<String>>,
    queue: ModelQueue<u32>,
    /// Attempts running on the fake worker: (task index, attempt).
    running: Vec<(usize, u32)>,
    /// Attempts whose operator-side state was lost; their workers may still answer late.
    zombies: Vec<(usize, u32)>,
    now: i64,
    succeeded: Vec<u32>,
}

impl Sim {
    fn new(n: usize, edges: &[(usize, usize)], back: &[(usize, usize)], cfgs: &[TaskCfg]) -> Sim {
        let names: Vec<String> = (0..n).map(|i| format!("t{i}.x-{i}")).collect();
        let mut deps: Vec<Vec<usize>> = vec![Vec::new(); n];
        for &(a, b) in edges {
            let (a, b) = (a % n, b % n);
            if b < a && !deps[a].contains(&b) {
                deps[a].push(b);
            }
        }
        for &(a, b) in back {
            let (a, b) = (a % n, b % n);
            if b > a && !deps[a].contains(&b) {
                deps[a].push(b);
            }
        }
        let graph: BTreeMap<String, Vec<String>> = (0..n)
            .map(|i| {
                (
                    names[i].clone(),
                    deps[i].iter().map(|&d| names[d].clone()).collect(),
                )
            })
            .collect();
        let specs = (0..n)
            .map(|i| {
                let c = &cfgs[i % cfgs.len()];
                let depends_on: Vec<String> = deps[i].iter().map(|&d| names[d].clone()).collect();
                let prompt = depends_on
                    .first()
                    .map(|d| format!("{{{{ tasks.{d}.v }}}} {{{{ input.text }}}}"));
                AtomicTaskSpec {
                    model: Some("m".into()),
                    depends_on,
                    prompt,
                    input: Some(TaskInput {
                        text: Some("x".into()),
                        value_from: None,
                    }),
                    timeout_seconds: Some(c.timeout),
                    active_deadline_seconds: c.deadline,
                    retries: Some(RetryPolicy {
                        limit: c.limit,
                        backoff_seconds: c.backoff,
                        max_backoff_seconds: 40,
                    }),
                    priority: c.priority,
                    cancel: c.cancel,
                    ..Default::default()
                }
            })
            .collect();
        Sim {
            cycles: find_cycles(&graph),
            names,
            specs,
            statuses: vec![AtomicTaskStatus::default(); n],
            dispatch: vec![DispatchState::Idle; n],
            queue: ModelQueue::new(),
            running: Vec::new(),
            zombies: Vec::new(),
            now: 1_000,
            succeeded: vec![0; n],
        }
    }

    fn ts(&self) -> Timestamp {
        Timestamp::from_second(self.now).unwrap()
    }

    fn decide(&self, i: usize, event: Event) -> Decision {
        let spec = &self.specs[i];
        let deps = spec
            .depends_on
            .iter()
            .map(|d| {
                let j = self.names.iter().position(|n| n == d).unwrap();
                let s = &self.statuses[j];
                (
                    d.as_str(),
                    DepState::Present {
                        phase: s.phase,
                        result: s.result.as_ref(),
                        message: s.message.as_deref(),
                    },
                )
            })
            .collect();
        let obs = Observation {
            now: self.ts(),
            deps,
            cycle: self.cycles.get(&self.names[i]).map(Vec::as_slice),
            input_text: Ok(Some("x")),
            dispatch: self.dispatch[i],
            deleted: false,
            created: None,
        };
        step(&self.names[i], spec, &self.statuses[i], &obs, event)
    }

    fn deps_succeeded(&self, i: usize) -> bool {
        self.specs[i].depends_on.iter().all(|d| {
            let j = self.names.iter().position(|n| n == d).unwrap();
            self.statuses[j].phase == TaskPhase::Succeeded
        })
    }

    /// Applies a decision like the operator would, checking the invariants on the way.
    fn apply(&mut self, i: usize, d: Decision) -> Result<(), TestCaseError> {
        let old = &self.statuses[i];
        let new = &d.status;
        if old.phase.is_terminal() {
            prop_assert_eq!(old, new, "terminal task {} changed", &self.names[i]);
            prop_assert!(d.enqueue.is_none());
        }
        if old.result.is_some() {
            prop_assert_eq!(&old.result, &new.result, "result of {} changed", &self.names[i]);
        }
        if new.phase == TaskPhase::Succeeded && old.phase != TaskPhase::Succeeded {
            self.succeeded[i] += 1;
            prop_assert!(new.result.is_some());
        }
        prop_assert!(self.succeeded[i] <= 1, "{} succeeded twice", &self.names[i]);
        if matches!(new.phase, TaskPhase::Running | TaskPhase::Succeeded) {
            prop_assert!(
                self.deps_succeeded(i),
                "{} is {:?} before its dependencies succeeded",
                &self.names[i],
                new.phase
            );
        }
        let limit = self.specs[i].retries.as_ref().map_or(1, |r| r.limit);
        prop_assert!(
            new.attempts <= limit + 1 + lost_attempts(new),
            "{}: {} attempts, limit {}, lost {}",
            &self.names[i],
            new.attempts,
            limit,
            lost_attempts(new)
        );
        if d.transition.is_some() {
            prop_assert!(new.reason.is_some() && new.message.is_some());
        }

        if d.abandon {
            self.queue.remove(&self.names[i]);
            if let Some(p) = self.running.iter().position(|(t, _)| *t == i) {
                let r = self.running.swap_remove(p);
                self.zombies.push(r);
            }
            self.dispatch[i] = DispatchState::Idle;
        }
        if let Some(e) = d.enqueue {
            self.queue
                .push(self.names[i].clone(), e.priority, e.not_before, e.attempt);
            self.dispatch[i] = DispatchState::Queued;
        }
        self.statuses[i] = d.status;
        Ok(())
    }

    fn event(&mut self, i: usize, event: Event) -> Result<(), TestCaseError> {
        let d = self.decide(i, event);
        self.apply(i, d)
    }

    /// The dispatcher starts the next due attempt, if any.
    fn start_one(&mut self) -> Result<bool, TestCaseError> {
        let Some(entry) = self.queue.pop_ready(self.ts()) else {
            return Ok(false);
        };
        let i = self.names.iter().position(|n| *n == entry.key).unwrap();
        let attempt = entry.payload;
        let d = self.decide(
            i,
            Event::AttemptStarted {
                attempt,
                worker: "w".into(),
            },
        );
        let accepted = !d.abandon;
        self.apply(i, d)?;
        if accepted {
            self.dispatch[i] = DispatchState::InFlight { attempt };
            self.running.push((i, attempt));
        } else {
            self.dispatch[i] = DispatchState::Idle;
        }
        Ok(true)
    }

    /// A running attempt reports; `outcome` picks what it says (4 = it hangs silently).
    fn finish_one(&mut self, pick: usize, outcome: u8, zombie: bool) -> Result<(), TestCaseError> {
        let list = if zombie {
            &mut self.zombies
        } else {
            &mut self.running
        };
        if list.is_empty() {
            return Ok(());
        }
        let (i, attempt) = list.swap_remove(pick % list.len());
        let event = match outcome % 5 {
            0 => Event::AttemptSucceeded {
                attempt,
                result: json!({"v": format!("r{i}")}),
            },
            1 => Event::AttemptFailed {
                attempt,
                reason: FailureReason::ServerError,
                message: "500".into(),
            },
            2 => Event::AttemptFailed {
                attempt,
                reason: FailureReason::Rejected,
                message: "400".into(),
            },
            3 => Event::AttemptFailed {
                attempt,
                reason: FailureReason::Timeout,
                message: "slow".into(),
            },
            _ => return Ok(()),
        };
        if !zombie {
            self.dispatch[i] = DispatchState::Idle;
        }
        self.event(i, event)
    }

    fn restart(&mut self) {
        self.queue = ModelQueue::new();
        self.zombies.append(&mut self.running);
        self.dispatch.iter_mut().for_each(|d| *d = DispatchState::Idle);
    }

    fn all_terminal(&self) -> bool {
        self.statuses.iter().all(|s| s.phase.is_terminal())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn random_graphs_and_event_orders(
        n in 1usize..30,
        edges in prop::collection::vec((0usize..30, 0usize..30), 0..60),
        back in prop::collection::vec((0usize..30, 0usize..30), 0..2),
        cfgs in prop::collection::vec(task_cfg(), 1..8),
        ops in prop::collection::vec((0u8..7, any::<u16>(), any::<u8>()), 0..300),
    ) {
        let mut sim = Sim::new(n, &edges, &back, &cfgs);
        for (op, a, b) in ops {
            match op {
                0 | 1 => sim.event(usize::from(a) % n, Event::Observe)?,
                2 => { sim.start_one()?; }
                3 => sim.finish_one(usize::from(a), b, false)?,
                4 => sim.now += i64::from(b % 40),
                5 if b % 8 == 0 => sim.restart(),
                6 => sim.finish_one(usize::from(a), b, true)?,
                _ => {}
            }
        }
        // Drive to the end: reconcile everything, run what is due, let workers succeed and
        // the clock move past any backoff or timeout.
        let mut rounds = 0;
        while !sim.all_terminal() {
            rounds += 1;
            prop_assert!(rounds <= 4 * n + 50, "not finished after {} rounds: {:?}",
                rounds, sim.statuses.iter().map(|s| s.phase).collect::<Vec<_>>());
            for i in 0..n {
                sim.event(i, Event::Observe)?;
            }
            while sim.start_one()? {}
            while !sim.running.is_empty() {
                sim.finish_one(0, 0, false)?;
            }
            sim.now += 61;
        }
        // Terminal phases are stable, and late answers change nothing.
        let before = sim.statuses.clone();
        while !sim.zombies.is_empty() {
            sim.finish_one(0, 0, true)?;
        }
        for i in 0..n {
            sim.event(i, Event::Observe)?;
        }
        prop_assert_eq!(&before, &sim.statuses);
        for i in 0..n {
            if sim.cycles.contains_key(&sim.names[i]) && !sim.specs[i].cancel {
                prop_assert_eq!(sim.statuses[i].phase, TaskPhase::Failed);
                prop_assert_eq!(sim.statuses[i].reason.as_deref(), Some("DependencyCycle"));
            }
            if sim.statuses[i].phase == TaskPhase::Succeeded {
                prop_assert_eq!(sim.succeeded[i], 1);
            }
        }
    }
}
