//! The spending budget of a run: tokens and cost of LLM requests, shared by every stage.
//!
//! `[pipeline] max_tokens` and `max_cost_usd` cap a run. Stages record what each request that
//! was actually sent cost (cache hits are free) and ask before sending the next; once a cap is
//! reached no new request starts, the stage stops with an error that says so, and everything
//! already paid for stays in the row cache, so a rerun with a higher cap continues from there.
//! Requests already in flight when the cap is reached still finish, so a run may overshoot by
//! at most one request per concurrency slot.

use std::sync::atomic::{AtomicU64, Ordering};

/// Spending so far and its caps; a stage's budget also counts against the run's (its parent).
#[derive(Debug, Default)]
pub struct Budget {
    tokens: AtomicU64,
    micro_usd: AtomicU64,
    max_tokens: Option<u64>,
    max_micro_usd: Option<u64>,
    scope: &'static str,
    parent: Option<std::sync::Arc<Budget>>,
}

impl Budget {
    /// A budget with optional caps.
    pub fn new(max_tokens: Option<u64>, max_cost_usd: Option<f64>) -> Self {
        Budget {
            max_tokens,
            max_micro_usd: max_cost_usd.map(|c| (c * 1e6).round() as u64),
            scope: "run",
            parent: None,
            ..Default::default()
        }
    }

    /// A stage's budget within the run's `parent`.
    pub fn stage(parent: std::sync::Arc<Budget>, max_tokens: Option<u64>, max_cost_usd: Option<f64>) -> Self {
        Budget { scope: "stage", parent: Some(parent), ..Budget::new(max_tokens, max_cost_usd) }
    }

    /// Records a request that was sent.
    pub fn spend(&self, tokens: u64, cost_usd: f64) {
        self.tokens.fetch_add(tokens, Ordering::SeqCst);
        self.micro_usd.fetch_add((cost_usd * 1e6).round() as u64, Ordering::SeqCst);
        if let Some(p) = &self.parent {
            p.spend(tokens, cost_usd);
        }
    }

    /// `Err` with an explanation once a cap is reached.
    pub fn check(&self) -> Result<(), String> {
        if let Some(p) = &self.parent {
            p.check()?;
        }
        let scope = self.scope;
        let tokens = self.tokens.load(Ordering::SeqCst);
        let micro = self.micro_usd.load(Ordering::SeqCst);
        if let Some(max) = self.max_tokens.filter(|&m| tokens >= m) {
            return Err(format!("the {scope}'s token budget is spent ({tokens} of `max_tokens` = {max})"));
        }
        if let Some(max) = self.max_micro_usd.filter(|&m| micro >= m) {
            return Err(format!(
                "the {scope}'s cost budget is spent (${:.4} of `max_cost_usd` = ${:.4})",
                micro as f64 / 1e6,
                max as f64 / 1e6
            ));
        }
        Ok(())
    }

    /// Tokens spent so far.
    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_stop_further_spending() {
        let b = Budget::new(Some(100), Some(0.01));
        assert!(b.check().is_ok());
        b.spend(60, 0.002);
        assert!(b.check().is_ok());
        b.spend(60, 0.002);
        assert!(b.check().unwrap_err().contains("120 of `max_tokens` = 100"));
        let c = Budget::new(None, Some(0.01));
        c.spend(1, 0.02);
        assert!(c.check().unwrap_err().contains("cost budget"));
        assert!(Budget::default().check().is_ok());

        let run = std::sync::Arc::new(Budget::new(Some(1000), None));
        let stage = Budget::stage(run.clone(), Some(10), None);
        stage.spend(10, 0.0);
        assert!(stage.check().unwrap_err().contains("the stage's token budget"));
        assert_eq!(run.tokens(), 10, "stage spending counts against the run");
    }
}
