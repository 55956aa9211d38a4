//! Adaptive concurrency that tells load from noise, after TCP's congestion control (RFC 5681
//! and NewReno's recovery, RFC 6582), with requests in flight as the window:
//!
//! - Each request gets a sequence number when it starts. A throttle (429, 503) decreases the
//!   limit only if its request started after the last decrease: the requests in flight at a
//!   decrease must complete before the next one counts, so a burst of throttles caused by one
//!   overload lowers the limit once, not once per request (`halves on every single 429` pinned
//!   the limit near 1 under a steady trickle of throttles).
//! - The decrease is gentle (x0.9) when few recent requests were throttled (providers throttle
//!   a share of requests at any load) and halves the limit when 30% or more were (the
//!   server is overloaded). "Recent" is a moving average over about a full window of outcomes
//!   (the maximum limit, at least 32), kept across decreases, so the first throttle after a
//!   decrease is not mistaken for all of them, and throttles answered at once are not mistaken
//!   for most of a window whose other requests are still being answered (with 256 requests out
//!   and a quarter throttled, the 64 instant 429s made a 32-outcome average read "most
//!   throttled", and the global pause below held every request for a second, every second).
//! - Server errors and timeouts count among the recent outcomes (the throttled share is the
//!   share of throttles among all answers, so a 5xx does not make throttles look severe), but
//!   neither grow nor lower the limit.
//! - Each success grows the limit by one, up to the configured maximum: like slow start, the
//!   limit doubles within about a round trip, so a limit lowered by noise is back quickly.
//! - Retry-After is obeyed by the request that got it (the client waits before retrying), and
//!   by every request (no new request starts until then) only while most recent requests are
//!   throttled.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The share of recent requests throttled above which a decrease halves the limit.
const SEVERE: f64 = 0.3;
/// The fewest outcomes the moving shares average over.
const MEMORY: usize = 32;
/// The gentle decrease factor.
const GENTLE: f64 = 0.9;

/// A concurrency limit that adapts to the server.
#[derive(Debug)]
pub struct AdaptiveLimit {
    state: Mutex<State>,
    freed: Notify,
}

#[derive(Debug)]
struct State {
    /// The limit; fractional so that gentle decreases add up.
    limit: f64,
    max: usize,
    in_flight: usize,
    /// The sequence number of the next request.
    next: u64,
    /// Throttles of requests that started at or before this number do not decrease the limit
    /// again (they were in flight at the last decrease).
    recovering_until: Option<u64>,
    /// The weight of one outcome in the moving shares: 1 / max(MEMORY, max).
    weight: f64,
    /// The moving share of recent requests that were throttled.
    throttled_share: f64,
    /// The moving share of recent requests that failed (throttled or errored).
    failed_share: f64,
    /// No request starts before this (a Retry-After while most requests are throttled).
    paused_until: Option<Instant>,
    /// When the limit was made: changes are traced with the time since.
    born: Instant,
}

impl State {
    /// Traces the limit (target `kiln_llm::limit`, at debug level): what a plot of the limit
    /// over time reads.
    fn trace(&self, why: &str) {
        tracing::debug!(target: "kiln_llm::limit", t_ms = self.born.elapsed().as_millis() as u64, limit = self.allowed(), why);
    }
}

impl State {
    fn allowed(&self) -> usize {
        (self.limit.floor() as usize).clamp(1, self.max)
    }
}

/// A slot in flight; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot<'a> {
    limiter: &'a AdaptiveLimit,
    seq: u64,
}

impl Slot<'_> {
    /// The request's sequence number, for [`AdaptiveLimit::throttled`].
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.limiter.state.lock() {
            s.in_flight -= 1;
        }
        self.limiter.freed.notify_waiters();
    }
}

impl AdaptiveLimit {
    /// A limit starting at, and never above, `max`.
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        let state = State {
            limit: max as f64,
            max,
            in_flight: 0,
            next: 0,
            recovering_until: None,
            weight: 1.0 / max.max(MEMORY) as f64,
            throttled_share: 0.0,
            failed_share: 0.0,
            paused_until: None,
            born: Instant::now(),
        };
        AdaptiveLimit { state: Mutex::new(state), freed: Notify::new() }
    }

    /// Waits for a free slot (and for the end of a global pause).
    pub async fn acquire(&self) -> Slot<'_> {
        loop {
            let notified = self.freed.notified();
            let pause = {
                let mut s = self.state.lock().expect("limiter lock");
                match s.paused_until.filter(|t| *t > Instant::now()) {
                    Some(until) => Some(until),
                    None if s.in_flight < s.allowed() => {
                        s.in_flight += 1;
                        s.next += 1;
                        return Slot { limiter: self, seq: s.next - 1 };
                    }
                    None => None,
                }
            };
            match pause {
                Some(until) => tokio::time::sleep_until(until).await,
                None => notified.await,
            }
        }
    }

    /// A request was answered normally.
    pub fn success(&self) {
        let mut s = self.state.lock().expect("limiter lock");
        s.throttled_share *= 1.0 - s.weight;
        s.failed_share *= 1.0 - s.weight;
        let grown = (s.limit + 1.0).min(s.max as f64);
        let more = grown.floor() > s.limit.floor();
        s.limit = grown;
        if more {
            s.trace("grow");
        }
        drop(s);
        if more {
            self.freed.notify_waiters();
        }
    }

    /// A request ended in another error (a server error, a timeout): it counts among the
    /// recent outcomes, so the throttled share stays the share of throttles, but it is not a
    /// sign of load and neither grows nor lowers the limit.
    pub fn errored(&self) {
        let mut s = self.state.lock().expect("limiter lock");
        s.throttled_share *= 1.0 - s.weight;
        s.failed_share = s.failed_share * (1.0 - s.weight) + s.weight;
    }

    /// The moving share of recent requests that failed, throttled or not: the client's backoff
    /// grows exponentially only when it is high.
    pub fn failed_share(&self) -> f64 {
        self.state.lock().map(|s| s.failed_share).unwrap_or(1.0)
    }

    /// Request `seq` was throttled (429, 503), with the server's Retry-After if it sent one.
    pub fn throttled(&self, seq: u64, retry_after: Option<Duration>) {
        let mut s = self.state.lock().expect("limiter lock");
        s.throttled_share = s.throttled_share * (1.0 - s.weight) + s.weight;
        s.failed_share = s.failed_share * (1.0 - s.weight) + s.weight;
        let rate = s.throttled_share;
        if let Some(after) = retry_after.filter(|_| rate > 0.5) {
            let until = Instant::now() + after;
            s.paused_until = Some(s.paused_until.map_or(until, |t| t.max(until)));
        }
        if s.recovering_until.is_some_and(|last| seq <= last) {
            return;
        }
        let factor = if rate >= SEVERE { 0.5 } else { GENTLE };
        s.limit = (s.limit * factor).max(1.0);
        s.recovering_until = Some(s.next.saturating_sub(1));
        s.trace("decrease");
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.state.lock().map(|s| s.allowed()).unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` slots of `l`, all held.
    async fn take(l: &AdaptiveLimit, n: usize) -> Vec<Slot<'_>> {
        let mut slots = Vec::with_capacity(n);
        for _ in 0..n {
            slots.push(l.acquire().await);
        }
        slots
    }

    #[tokio::test]
    async fn throttles_answered_first_are_not_mistaken_for_most_of_the_window() {
        // 256 requests out, a quarter throttled with Retry-After: the 429s come back at once,
        // before the other requests of the window are answered.
        let l = AdaptiveLimit::new(256);
        let mut window = take(&l, 256).await;
        for slot in window.drain(..64) {
            l.throttled(slot.seq(), Some(Duration::from_secs(1)));
        }
        let next = tokio::time::timeout(Duration::from_millis(100), l.acquire()).await;
        assert!(next.is_ok(), "no global pause: most of the window was not throttled");
        assert_eq!(l.limit(), 230, "one gentle decrease for the window");
    }

    #[tokio::test]
    async fn a_burst_of_throttles_lowers_the_limit_once_per_window() {
        let l = AdaptiveLimit::new(32);
        let window = take(&l, 32).await;
        for slot in window {
            l.throttled(slot.seq(), None);
        }
        assert_eq!(l.limit(), 28, "32 throttles of one window: one decrease (gentle: the first came alone)");
        let after = l.acquire().await;
        l.throttled(after.seq(), None);
        assert_eq!(l.limit(), 14, "a request started after the decrease counts again, now as an overload");
    }

    #[tokio::test]
    async fn a_lone_throttle_is_a_gentle_decrease_and_success_grows_back_fast() {
        let l = AdaptiveLimit::new(20);
        for _ in 0..9 {
            drop(l.acquire().await);
            l.success();
        }
        let seq = l.acquire().await.seq();
        l.throttled(seq, None);
        assert_eq!(l.limit(), 18, "x0.9 for a throttle among successes");
        l.success();
        l.success();
        assert_eq!(l.limit(), 20, "back within a couple of successes");
    }

    /// A window of requests in flight against a server that throttles 10% of them at random,
    /// at any load.
    #[tokio::test]
    async fn random_ten_percent_throttles_keep_the_limit_above_half() {
        let l = AdaptiveLimit::new(64);
        let mut in_flight = std::collections::VecDeque::new();
        let mut lowest = usize::MAX;
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            while in_flight.len() < l.limit() {
                in_flight.push_back(l.acquire().await);
            }
            let slot = in_flight.pop_front().unwrap();
            if rng.f64() < 0.1 {
                l.throttled(slot.seq(), None)
            } else {
                l.success()
            }
            drop(slot);
            lowest = lowest.min(l.limit());
        }
        assert!(lowest > 32, "the limit fell to {lowest} of 64");
    }

    #[test]
    fn server_errors_dilute_the_throttled_share() {
        // A quarter of outcomes throttled and a quarter server errors: a gentle decrease, not
        // a halving, since throttles are a quarter of the answers, not a third.
        let limit = AdaptiveLimit::new(100);
        for i in 0..400u64 {
            match i % 4 {
                0 => limit.throttled(i, None),
                1 => limit.errored(),
                _ => limit.success(),
            }
        }
        let share = limit.state.lock().unwrap().throttled_share;
        assert!((0.2..0.3).contains(&share), "{share}");
        limit.state.lock().unwrap().recovering_until = None;
        let before = limit.state.lock().unwrap().limit;
        limit.throttled(1000, None);
        let after = limit.state.lock().unwrap().limit;
        assert!((after / before - GENTLE).abs() < 1e-9, "{before} -> {after}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_throttles_everything_drives_it_to_one_and_is_waited_for() {
        let l = AdaptiveLimit::new(64);
        for _ in 0..100 {
            let seq = l.acquire().await.seq();
            l.throttled(seq, None);
        }
        assert_eq!(l.limit(), 1);
        let seq = l.acquire().await.seq();
        l.throttled(seq, Some(Duration::from_secs(2)));
        let start = Instant::now();
        let _slot = l.acquire().await;
        assert!(start.elapsed() >= Duration::from_secs(2), "Retry-After holds every request while most are throttled");
    }

    #[tokio::test]
    async fn a_retry_after_among_few_throttles_holds_only_its_request() {
        let l = AdaptiveLimit::new(8);
        for _ in 0..9 {
            drop(l.acquire().await);
            l.success();
        }
        let seq = l.acquire().await.seq();
        l.throttled(seq, Some(Duration::from_secs(30)));
        let next = tokio::time::timeout(Duration::from_millis(50), l.acquire()).await;
        assert!(next.is_ok(), "no global pause when one request in ten is throttled");
    }

    #[tokio::test]
    async fn slots_are_waited_for_and_reused() {
        let l = AdaptiveLimit::new(8);
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(l.acquire().await);
        }
        let ninth = tokio::time::timeout(Duration::from_millis(20), l.acquire()).await;
        assert!(ninth.is_err(), "a ninth request waits while eight are in flight");
        drop(held);
        assert!(tokio::time::timeout(Duration::from_millis(20), l.acquire()).await.is_ok(), "freed slots are reused");
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
