//! Adaptive concurrency: additive increase, multiplicative decrease.
//!
//! The limit starts at the configured maximum, halves (down to 1) when the server says it is
//! overloaded (429, 503), and grows back by one after a limit's worth of successes.

use std::sync::Mutex;

use tokio::sync::Notify;

/// A concurrency limit that adapts to the server.
#[derive(Debug)]
pub struct AdaptiveLimit {
    state: Mutex<State>,
    freed: Notify,
}

#[derive(Debug)]
struct State {
    limit: usize,
    max: usize,
    in_flight: usize,
    successes: usize,
}

/// A slot in flight; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot<'a>(&'a AdaptiveLimit);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.state.lock() {
            s.in_flight -= 1;
        }
        self.0.freed.notify_waiters();
    }
}

impl AdaptiveLimit {
    /// A limit starting at, and never above, `max`.
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        AdaptiveLimit { state: Mutex::new(State { limit: max, max, in_flight: 0, successes: 0 }), freed: Notify::new() }
    }

    /// Waits for a free slot.
    pub async fn acquire(&self) -> Slot<'_> {
        loop {
            let notified = self.freed.notified();
            {
                let mut s = self.state.lock().expect("limiter lock");
                if s.in_flight < s.limit {
                    s.in_flight += 1;
                    return Slot(self);
                }
            }
            notified.await;
        }
    }

    /// The server answered normally.
    pub fn success(&self) {
        let mut s = self.state.lock().expect("limiter lock");
        s.successes += 1;
        if s.successes >= s.limit && s.limit < s.max {
            s.limit += 1;
            s.successes = 0;
            drop(s);
            self.freed.notify_waiters();
        }
    }

    /// The server is overloaded: halve the limit.
    pub fn throttled(&self) {
        let mut s = self.state.lock().expect("limiter lock");
        s.limit = (s.limit / 2).max(1);
        s.successes = 0;
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.state.lock().map(|s| s.limit).unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn halves_on_throttle_and_grows_back_slowly() {
        let l = AdaptiveLimit::new(8);
        l.throttled();
        l.throttled();
        assert_eq!(l.limit(), 2);
        l.success();
        assert_eq!(l.limit(), 2);
        l.success();
        assert_eq!(l.limit(), 3);
        (0..100).for_each(|_| l.success());
        assert_eq!(l.limit(), 8);
        let held: Vec<_> = acquire_all(&l, 8).await;
        assert_eq!(held.len(), 8);
        let ninth = tokio::time::timeout(std::time::Duration::from_millis(20), l.acquire()).await;
        assert!(ninth.is_err(), "a ninth request waits while eight are in flight");
        drop(held);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), l.acquire()).await.is_ok(),
            "freed slots are reused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn per_minute_budgets_pace_requests() {
        let b = Budget::new(60);
        let start = tokio::time::Instant::now();
        for _ in 0..60 {
            b.take(1.0).await;
        }
        assert!(start.elapsed() < std::time::Duration::from_millis(10), "a full budget starts at once");
        b.take(1.0).await;
        b.take(1.0).await;
        let waited = start.elapsed().as_secs_f64();
        assert!((1.9..2.2).contains(&waited), "then one per second: {waited}");
    }

    async fn acquire_all(l: &AdaptiveLimit, n: usize) -> Vec<Slot<'_>> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(l.acquire().await);
        }
        v
    }
}

/// A per-minute budget (requests or tokens), refilled continuously.
#[derive(Debug)]
pub struct Budget {
    per_minute: f64,
    state: tokio::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl Budget {
    /// A budget of `per_minute` units, full at the start.
    pub fn new(per_minute: u32) -> Self {
        let per_minute = f64::from(per_minute.max(1));
        Budget { per_minute, state: tokio::sync::Mutex::new((per_minute, tokio::time::Instant::now())) }
    }

    /// Waits until `units` are available and takes them (a request larger than the whole
    /// budget waits for a full minute's worth).
    pub async fn take(&self, units: f64) {
        let units = units.min(self.per_minute);
        let mut s = self.state.lock().await;
        loop {
            let now = tokio::time::Instant::now();
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.per_minute / 60.0).min(self.per_minute);
            s.1 = now;
            if s.0 >= units {
                s.0 -= units;
                return;
            }
            let wait = (units - s.0) * 60.0 / self.per_minute;
            tokio::time::sleep(std::time::Duration::from_secs_f64(wait)).await;
        }
    }
}
