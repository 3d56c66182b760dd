//! Retry arithmetic: the exponential backoff between failed attempts of a task.

use std::time::Duration;

use crate::api::task::RetryPolicy;

/// Delay before the next attempt after `failed_attempts` failures (counted from 1; 0 is treated
/// as 1): `backoffSeconds * 2^(failed_attempts - 1)`, capped at `maxBackoffSeconds`. Never
/// overflows, whatever the inputs.
pub fn backoff(policy: &RetryPolicy, failed_attempts: u32) -> Duration {
    let exponent = failed_attempts.saturating_sub(1);
    let base = u64::from(policy.backoff_seconds);
    // checked_shl fails for exponents >= 64; any such delay saturates to the cap anyway.
    let delay = if base == 0 {
        0
    } else {
        1u64.checked_shl(exponent)
            .and_then(|f| base.checked_mul(f))
            .unwrap_or(u64::MAX)
    };
    Duration::from_secs(delay.min(u64::from(policy.max_backoff_seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(backoff: u32, max: u32) -> RetryPolicy {
        RetryPolicy {
            limit: 3,
            backoff_seconds: backoff,
            max_backoff_seconds: max,
        }
    }

    #[test]
    fn doubles_from_the_base() {
        let p = policy(5, 300);
        let secs: Vec<u64> = (1..=8).map(|n| backoff(&p, n).as_secs()).collect();
        assert_eq!(secs, vec![5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff(&p, 0), Duration::from_secs(5));
    }

    #[test]
    fn defaults_match_the_api() {
        assert_eq!(backoff(&RetryPolicy::default(), 1), Duration::from_secs(5));
    }

    #[test]
    fn never_overflows() {
        let p = policy(u32::MAX, u32::MAX);
        for n in [1, 2, 33, 63, 64, 65, 1000, u32::MAX] {
            assert!(backoff(&p, n) <= Duration::from_secs(u64::from(u32::MAX)));
        }
        assert_eq!(backoff(&p, u32::MAX), Duration::from_secs(u64::from(u32::MAX)));
        assert_eq!(backoff(&policy(0, 300), 50), Duration::ZERO);
        assert_eq!(backoff(&policy(7, 0), 3), Duration::ZERO);
    }
}
