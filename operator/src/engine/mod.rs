//! The pure, sans-IO core of the operator: task state machine, dependency DAG, prompt
//! templating, retry and timeout arithmetic, dispatch queues and autoscaling decisions.
//! Nothing here touches the network or the clock; callers pass `now` in.

pub mod dag;
pub mod queue;
pub mod retry;
pub mod state;
pub mod template;

#[cfg(test)]
mod sim_tests;

/// Why one attempt of a task failed, as seen by whoever ran it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The worker or endpoint answered 5xx.
    ServerError,
    /// The worker or endpoint answered 429 (overloaded).
    Overloaded,
    /// The request was rejected with 4xx other than 408/409/429; retrying will not help.
    Rejected,
    /// The connection could not be made or broke off.
    Unreachable,
    /// The attempt ran past its timeout.
    Timeout,
    /// The answer could not be understood.
    BadResponse,
    /// The attempt was lost (operator restart, worker pod gone) before it reported.
    Lost,
}

impl FailureReason {
    /// Whether another attempt may succeed.
    pub fn is_retryable(self) -> bool {
        !matches!(self, FailureReason::Rejected)
    }

    /// CamelCase name used in status reasons and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::ServerError => "ServerError",
            FailureReason::Overloaded => "Overloaded",
            FailureReason::Rejected => "Rejected",
            FailureReason::Unreachable => "Unreachable",
            FailureReason::Timeout => "Timeout",
            FailureReason::BadResponse => "BadResponse",
            FailureReason::Lost => "Lost",
        }
    }
}
