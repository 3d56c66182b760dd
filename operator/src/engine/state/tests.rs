//! Unit tests of the task state machine, one rule at a time.

use super::*;
use crate::api::task::{HttpCall, RetryPolicy, TaskInput};
use serde_json::json;

fn ts(s: i64) -> Timestamp {
    Timestamp::from_second(s).unwrap()
}

fn spec() -> AtomicTaskSpec {
    AtomicTaskSpec {
        model: Some("m".into()),
        input: Some(TaskInput {
            text: Some("hi".into()),
            value_from: None,
        }),
        retries: Some(RetryPolicy {
            limit: 2,
            backoff_seconds: 5,
            max_backoff_seconds: 300,
        }),
        ..Default::default()
    }
}

fn obs<'a>(now: i64) -> Observation<'a> {
    Observation {
        now: ts(now),
        deps: BTreeMap::new(),
        cycle: None,
        input_text: Ok(Some("hi")),
        dispatch: DispatchState::Idle,
        deleted: false,
        created: None,
    }
}

fn observe(spec: &AtomicTaskSpec, status: &AtomicTaskStatus, o: &Observation) -> Decision {
    step("t", spec, status, o, Event::Observe)
}

/// Runs a task from Pending to Running attempt 1 at time 0.
fn running(spec: &AtomicTaskSpec) -> AtomicTaskStatus {
    let d = observe(spec, &AtomicTaskStatus::default(), &obs(0));
    assert_eq!(d.status.phase, TaskPhase::Queued);
    let mut o = obs(0);
    o.dispatch = DispatchState::Queued;
    let d = step(
        "t",
        spec,
        &d.status,
        &o,
        Event::AttemptStarted {
            attempt: 1,
            worker: "w1".into(),
        },
    );
    assert_eq!(d.status.phase, TaskPhase::Running);
    d.status
}

fn in_flight<'a>(now: i64, attempt: u32) -> Observation<'a> {
    let mut o = obs(now);
    o.dispatch = DispatchState::InFlight { attempt };
    o
}

#[test]
fn pending_without_deps_is_queued_with_rendered_prompt() {
    let mut s = spec();
    s.prompt = Some("Say: {{ input.text }}".into());
    s.priority = 7;
    let d = observe(&s, &AtomicTaskStatus::default(), &obs(10));
    assert_eq!(d.status.phase, TaskPhase::Queued);
    assert_eq!(d.status.queued_time, Some(Time(ts(10))));
    assert_eq!(
        d.enqueue,
        Some(Dispatch {
            prompt: "Say: hi".into(),
            not_before: None,
            priority: 7,
            attempt: 1
        })
    );
    let t = d.transition.unwrap();
    assert_eq!(
        (t.from, t.to, t.reason),
        (TaskPhase::Pending, TaskPhase::Queued, "Queued")
    );
    assert_eq!(d.status.reason.as_deref(), Some("Queued"));
}

#[test]
fn cycle_fails() {
    let cycle = vec!["t".to_string(), "u".to_string(), "t".to_string()];
    let mut o = obs(0);
    o.cycle = Some(&cycle);
    let d = observe(&spec(), &AtomicTaskStatus::default(), &o);
    assert_eq!(d.status.phase, TaskPhase::Failed);
    assert_eq!(d.status.reason.as_deref(), Some("DependencyCycle"));
    assert_eq!(d.status.message.as_deref(), Some("dependency cycle: t -> u -> t"));
    assert!(d.status.completion_time.is_some());
    let ready = d
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == READY_CONDITION)
        .unwrap();
    assert_eq!(ready.status, "False");
}

#[test]
fn template_reference_outside_depends_on_fails() {
    let mut s = spec();
    s.prompt = Some("{{ tasks.other.x }}".into());
    let d = observe(&s, &AtomicTaskStatus::default(), &obs(0));
    assert_eq!(d.status.phase, TaskPhase::Failed);
    assert_eq!(d.status.reason.as_deref(), Some("InvalidTemplate"));
    assert!(d.status.message.unwrap().contains("tasks.other.x"));
}

#[test]
fn dependencies_block_fail_and_release() {
    let mut s = spec();
    s.depends_on = vec!["a".into(), "b".into()];
    s.prompt = Some("{{ tasks.a.label }}/{{ tasks.b }}".into());
    let mut o = obs(0);
    o.deps.insert(
        "a",
        DepState::Present {
            phase: TaskPhase::Running,
            result: None,
            message: None,
        },
    );
    let d = observe(&s, &AtomicTaskStatus::default(), &o);
    assert_eq!(d.status.phase, TaskPhase::Blocked);
    assert_eq!(
        d.status.message.as_deref(),
        Some("waiting for dependencies: a (Running), b (not found)")
    );
    assert_eq!(d.requeue_after, None);
    let blocked = d.status;

    let mut failed = o.clone();
    failed.deps.insert(
        "b",
        DepState::Present {
            phase: TaskPhase::TimedOut,
            result: None,
            message: Some("too slow"),
        },
    );
    let d = observe(&s, &blocked, &failed);
    assert_eq!(d.status.phase, TaskPhase::Failed);
    assert_eq!(d.status.reason.as_deref(), Some("DependencyFailed"));
    assert_eq!(
        d.status.message.as_deref(),
        Some("dependency b ended TimedOut: too slow")
    );

    let (ra, rb) = (json!({"label": "spam"}), json!("text"));
    let mut ok = obs(5);
    for (name, r) in [("a", &ra), ("b", &rb)] {
        ok.deps.insert(
            name,
            DepState::Present {
                phase: TaskPhase::Succeeded,
                result: Some(r),
                message: None,
            },
        );
    }
    let d = observe(&s, &blocked, &ok);
    assert_eq!(d.status.phase, TaskPhase::Queued);
    assert_eq!(d.enqueue.unwrap().prompt, "spam/text");
    assert_eq!(d.transition.unwrap().from, TaskPhase::Blocked);
}

#[test]
fn input_and_render_errors_fail() {
    let mut o = obs(0);
    o.input_text = Err("configmap cm not found");
    let d = observe(&spec(), &AtomicTaskStatus::default(), &o);
    assert_eq!(d.status.phase, TaskPhase::Failed);
    assert_eq!(d.status.reason.as_deref(), Some("InputUnavailable"));
    assert!(d.status.message.unwrap().contains("configmap cm not found"));

    let mut o = obs(0);
    o.input_text = Ok(None);
    let d = observe(&spec(), &AtomicTaskStatus::default(), &o);
    assert_eq!(d.status.reason.as_deref(), Some("TemplateError"));
}

#[test]
fn http_tasks_render_the_body() {
    let mut s = spec();
    s.operation = Operation::Http;
    s.model = None;
    s.http = Some(HttpCall {
        url: "http://x".into(),
        body: Some(r#"{"q": "{{ input.text }}"}"#.into()),
        ..Default::default()
    });
    let d = observe(&s, &AtomicTaskStatus::default(), &obs(0));
    assert_eq!(d.enqueue.unwrap().prompt, r#"{"q": "hi"}"#);
}

#[test]
fn start_and_succeed_exactly_once() {
    let s = spec();
    let st = running(&s);
    assert_eq!(st.attempts, 1);
    assert_eq!(st.worker.as_deref(), Some("w1"));
    assert_eq!(st.start_time, Some(Time(ts(0))));
    assert_eq!(st.attempt_start_time, Some(Time(ts(0))));

    // Reconcile while in flight: nothing changes, look again at the attempt timeout.
    let d = observe(&s, &st, &in_flight(10, 1));
    assert_eq!(d.status, st);
    assert_eq!(d.requeue_after, Some(Duration::from_secs(50)));

    // A report for another attempt is ignored.
    let d = step(
        "t",
        &s,
        &st,
        &in_flight(1, 1),
        Event::AttemptSucceeded {
            attempt: 2,
            result: json!(1),
        },
    );
    assert_eq!(d.status, st);

    let d = step(
        "t",
        &s,
        &st,
        &in_flight(3, 1),
        Event::AttemptSucceeded {
            attempt: 1,
            result: json!({"x": 1}),
        },
    );
    assert_eq!(d.status.phase, TaskPhase::Succeeded);
    assert_eq!(d.status.result, Some(json!({"x": 1})));
    assert_eq!(d.status.completion_time, Some(Time(ts(3))));
    let ready = d
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == READY_CONDITION)
        .unwrap();
    assert_eq!(ready.status, "True");
    let done = d.status;

    for event in [
        Event::AttemptSucceeded {
            attempt: 1,
            result: json!(2),
        },
        Event::AttemptFailed {
            attempt: 1,
            reason: FailureReason::ServerError,
            message: "x".into(),
        },
        Event::Observe,
    ] {
        let d = step("t", &s, &done, &obs(4), event);
        assert_eq!(d.status, done);
        assert_eq!(d.transition, None);
    }
    let d = step(
        "t",
        &s,
        &done,
        &obs(4),
        Event::AttemptStarted {
            attempt: 2,
            worker: "w".into(),
        },
    );
    assert_eq!(d.status, done);
    assert!(d.abandon);
}

#[test]
fn retryable_failures_back_off_then_fail() {
    let s = spec();
    let mut st = running(&s);
    let mut expected_backoff = 5;
    for attempt in 1..=3u32 {
        let now = i64::from(attempt) * 1000;
        let d = step(
            "t",
            &s,
            &st,
            &in_flight(now, attempt),
            Event::AttemptFailed {
                attempt,
                reason: FailureReason::ServerError,
                message: "boom".into(),
            },
        );
        if attempt == 3 {
            assert_eq!(d.status.phase, TaskPhase::Failed);
            assert_eq!(d.status.reason.as_deref(), Some("ServerError"));
            assert!(d.status.message.unwrap().contains("no retries left"));
            return;
        }
        assert_eq!(d.status.phase, TaskPhase::Queued);
        let due = ts(now + expected_backoff);
        assert_eq!(d.status.next_attempt_time, Some(Time(due)));
        let e = d.enqueue.clone().unwrap();
        assert_eq!((e.not_before, e.attempt), (Some(due), attempt + 1));
        assert_eq!(
            d.requeue_after,
            Some(Duration::from_secs(expected_backoff as u64))
        );
        expected_backoff *= 2;
        // After a restart the dispatcher is idle: the same attempt is queued again.
        let again = observe(&s, &d.status, &obs(now + 1));
        assert_eq!(again.status, d.status);
        assert_eq!(again.enqueue, Some(e));
        let mut o = obs(now + 100);
        o.dispatch = DispatchState::Queued;
        st = step(
            "t",
            &s,
            &d.status,
            &o,
            Event::AttemptStarted {
                attempt: attempt + 1,
                worker: "w2".into(),
            },
        )
        .status;
        assert_eq!(st.phase, TaskPhase::Running);
        assert_eq!(
            st.start_time,
            Some(Time(ts(0))),
            "start time is the first attempt's"
        );
    }
}

#[test]
fn rejected_is_not_retried() {
    let s = spec();
    let st = running(&s);
    let d = step(
        "t",
        &s,
        &st,
        &in_flight(1, 1),
        Event::AttemptFailed {
            attempt: 1,
            reason: FailureReason::Rejected,
            message: "400".into(),
        },
    );
    assert_eq!(d.status.phase, TaskPhase::Failed);
    assert!(d.status.message.unwrap().contains("not retryable"));
}

#[test]
fn timeouts_retry_then_time_out() {
    let mut s = spec();
    s.timeout_seconds = Some(30);
    s.retries = Some(RetryPolicy {
        limit: 0,
        ..Default::default()
    });
    let st = running(&s);
    let d = observe(&s, &st, &in_flight(29, 1));
    assert_eq!(d.status, st);
    assert_eq!(d.requeue_after, Some(Duration::from_secs(1)));
    let d = observe(&s, &st, &in_flight(30, 1));
    assert_eq!(d.status.phase, TaskPhase::TimedOut);
    assert_eq!(d.status.reason.as_deref(), Some("Timeout"));
    assert!(d.abandon);

    s.retries = None;
    let st = running(&s);
    let d = observe(&s, &st, &in_flight(31, 1));
    assert_eq!(d.status.phase, TaskPhase::Queued);
    assert!(d.abandon);
    assert!(d.enqueue.is_some());
}

#[test]
fn lost_attempts_retry_at_once_without_using_the_limit() {
    let mut s = spec();
    s.retries = Some(RetryPolicy {
        limit: 0,
        ..Default::default()
    });
    let mut st = running(&s);
    for attempt in 1..=3u32 {
        // The operator restarted: nothing is in flight.
        let d = observe(&s, &st, &obs(i64::from(attempt)));
        assert_eq!(d.status.phase, TaskPhase::Queued, "attempt {attempt}");
        assert_eq!(d.status.reason.as_deref(), Some("Lost"));
        assert_eq!(d.status.next_attempt_time, None);
        assert_eq!(d.enqueue.as_ref().unwrap().not_before, None);
        assert!(d.abandon);
        assert_eq!(lost_attempts(&d.status), attempt);
        let mut o = obs(i64::from(attempt));
        o.dispatch = DispatchState::Queued;
        st = step(
            "t",
            &s,
            &d.status,
            &o,
            Event::AttemptStarted {
                attempt: attempt + 1,
                worker: "w".into(),
            },
        )
        .status;
        assert_eq!(st.attempts, attempt + 1);
    }
    let d = step(
        "t",
        &s,
        &st,
        &in_flight(10, 4),
        Event::AttemptFailed {
            attempt: 4,
            reason: FailureReason::Unreachable,
            message: "down".into(),
        },
    );
    assert_eq!(d.status.phase, TaskPhase::Failed);
    assert_eq!(d.status.attempts, 4);
}

#[test]
fn active_deadline_times_out() {
    let mut s = spec();
    s.active_deadline_seconds = Some(20);
    s.timeout_seconds = Some(60);
    let st = running(&s);
    let d = observe(&s, &st, &in_flight(5, 1));
    assert_eq!(d.requeue_after, Some(Duration::from_secs(15)));
    let d = observe(&s, &st, &in_flight(20, 1));
    assert_eq!(d.status.phase, TaskPhase::TimedOut);
    assert_eq!(d.status.reason.as_deref(), Some("DeadlineExceeded"));
    assert!(d.abandon);
}

#[test]
fn active_deadline_counts_from_creation_so_a_task_waiting_for_workers_ends() {
    let mut s = spec();
    s.active_deadline_seconds = Some(20);
    let queued = observe(&s, &AtomicTaskStatus::default(), &obs(0)).status;
    assert_eq!(queued.phase, TaskPhase::Queued);
    let mut o = obs(25);
    o.created = Some(ts(0));
    o.dispatch = DispatchState::Queued;
    let d = observe(&s, &queued, &o);
    assert_eq!(d.status.phase, TaskPhase::TimedOut);
    assert_eq!(d.status.reason.as_deref(), Some("DeadlineExceeded"));
    assert!(d.abandon, "the queued job is dropped");
}

#[test]
fn cancel_and_delete() {
    let mut s = spec();
    let st = running(&s);
    s.cancel = true;
    let d = observe(&s, &st, &in_flight(1, 1));
    assert_eq!(d.status.phase, TaskPhase::Cancelled);
    assert_eq!(d.status.reason.as_deref(), Some("Cancelled"));
    assert!(d.abandon);

    let s = spec();
    let mut o = obs(0);
    o.deleted = true;
    let d = observe(&s, &AtomicTaskStatus::default(), &o);
    assert_eq!(d.status.phase, TaskPhase::Cancelled);
    assert_eq!(d.status.reason.as_deref(), Some("Deleted"));
}

#[test]
fn ttl_deletes_finished_tasks() {
    let mut s = spec();
    s.ttl_seconds_after_finished = Some(100);
    let st = running(&s);
    let d = step(
        "t",
        &s,
        &st,
        &in_flight(10, 1),
        Event::AttemptSucceeded {
            attempt: 1,
            result: json!(null),
        },
    );
    assert!(!d.delete);
    assert_eq!(d.requeue_after, Some(Duration::from_secs(100)));
    let d2 = observe(&s, &d.status, &obs(50));
    assert_eq!(
        (d2.delete, d2.requeue_after),
        (false, Some(Duration::from_secs(60)))
    );
    let d3 = observe(&s, &d.status, &obs(110));
    assert!(d3.delete);
    assert_eq!(d3.status, d.status);
}

#[test]
fn times_are_stored_at_second_precision() {
    let now = ts(100).checked_add(Duration::from_millis(700)).unwrap();
    let mut o = obs(0);
    o.now = now;
    let d = observe(&spec(), &AtomicTaskStatus::default(), &o);
    assert_eq!(d.status.queued_time, Some(Time(ts(100))));
    let json = serde_json::to_value(&d.status).unwrap();
    let back: AtomicTaskStatus = serde_json::from_value(json).unwrap();
    assert_eq!(back, d.status);
}
