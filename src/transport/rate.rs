//! Per-connection inbound rate limit: a token bucket holding one second's
//! worth of messages, and a count of consecutive seconds with refusals.

use std::time::Instant;

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refuse this message with `rate_limited`.
    Refuse,
    /// Refused in each of the last three seconds: close the connection (1008).
    Close,
}

pub struct RateLimit {
    per_sec: f64,
    tokens: f64,
    last: Instant,
    origin: Instant,
    last_refused_sec: Option<u64>,
    streak: u32,
}

/// Seconds in a row with refusals that close a connection.
pub const CLOSE_AFTER_SECONDS: u32 = 3;

impl RateLimit {
    pub fn new(per_sec: u32, now: Instant) -> Self {
        RateLimit {
            per_sec: f64::from(per_sec),
            tokens: f64::from(per_sec),
            last: now,
            origin: now,
            last_refused_sec: None,
            streak: 0,
        }
    }

    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.per_sec);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allow;
        }
        let sec = now.saturating_duration_since(self.origin).as_secs();
        match self.last_refused_sec {
            Some(s) if s == sec => {}
            Some(s) if s + 1 == sec => self.streak += 1,
            _ => self.streak = 1,
        }
        self.last_refused_sec = Some(sec);
        if self.streak >= CLOSE_AFTER_SECONDS {
            Verdict::Close
        } else {
            Verdict::Refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refuse_then_close_after_three_seconds() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10, t0);
        for _ in 0..10 {
            assert_eq!(r.check(t0), Verdict::Allow);
        }
        assert_eq!(r.check(t0), Verdict::Refuse);
        // Second 1: refills, burst again, refused again.
        let t1 = t0 + Duration::from_millis(1000);
        for _ in 0..10 {
            assert_eq!(r.check(t1), Verdict::Allow);
        }
        assert_eq!(r.check(t1), Verdict::Refuse);
        let t2 = t0 + Duration::from_millis(2000);
        for _ in 0..10 {
            r.check(t2);
        }
        assert_eq!(r.check(t2), Verdict::Close);
    }

    #[test]
    fn a_quiet_second_resets_the_streak() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(1, t0);
        r.check(t0);
        assert_eq!(r.check(t0), Verdict::Refuse);
        let t1 = t0 + Duration::from_millis(1500);
        r.check(t1);
        assert_eq!(r.check(t1), Verdict::Refuse);
        // Second 2 has no refusal; second 3 starts a new streak.
        let t3 = t0 + Duration::from_millis(3500);
        r.check(t3);
        assert_eq!(r.check(t3), Verdict::Refuse);
        let t4 = t0 + Duration::from_millis(4500);
        r.check(t4);
        assert_eq!(r.check(t4), Verdict::Refuse);
    }
}
