//! The retry schedule, as pure functions of attempts and time.

use std::time::Duration;

/// Delay before the next attempt after `attempts` failed attempts (≥ 1):
/// the schedule's entries in order, the last one repeating.
pub fn retry_delay(schedule: &[Duration], attempts: u32) -> Duration {
    let index = (attempts.max(1) - 1) as usize;
    schedule
        .get(index)
        .or(schedule.last())
        .copied()
        .unwrap_or(Duration::from_secs(300))
}

/// Whether a message that arrived at `arrival_ms` has outlived `max_age` at `now_ms`.
pub fn is_expired(arrival_ms: u64, now_ms: u64, max_age: Duration) -> bool {
    now_ms.saturating_sub(arrival_ms) >= max_age.as_millis() as u64
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_steps_then_repeats_its_last_delay() {
        let s = |n| Duration::from_secs(n);
        let schedule = [s(60), s(300), s(900)];
        assert_eq!(retry_delay(&schedule, 1), s(60));
        assert_eq!(retry_delay(&schedule, 2), s(300));
        assert_eq!(retry_delay(&schedule, 3), s(900));
        assert_eq!(retry_delay(&schedule, 40), s(900));
        assert_eq!(retry_delay(&schedule, 0), s(60));
    }

    #[test]
    fn expiry() {
        let day = Duration::from_secs(86_400);
        assert!(!is_expired(1_000, 1_000 + 86_399_999, day));
        assert!(is_expired(1_000, 1_000 + 86_400_000, day));
        assert!(!is_expired(5_000, 1_000, day));
    }
}
