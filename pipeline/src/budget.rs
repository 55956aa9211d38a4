//! The spending budget of a run: tokens and cost of LLM requests, shared by every stage.
//!
//! `[pipeline] max_tokens` and `max_cost_usd` cap a run. Stages record what each request that
//! was actually sent cost (cache hits are free) and ask before sending the next; once a cap is
//! reached no new request starts, the stage stops with an error that says so, and everything
//! already paid for stays in the row cache, so a rerun with a higher cap continues from there.
//! Requests already in flight when the cap is reached still finish, so a run may overshoot by
//! at most one request per concurrency slot.

use std::sync::atomic::{AtomicU64, Ordering};

/// A cap that was reached: of the run or of a stage (`scope`), what was spent and the cap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Spent {
    /// Tokens.
    #[error("the {scope}'s token budget is spent ({spent} of `max_tokens` = {max})")]
    Tokens {
        /// `run` or `stage`.
        scope: &'static str,
        /// Tokens spent.
        spent: u64,
        /// The cap.
        max: u64,
    },
    /// Cost, in millionths of a USD.
    #[error(
        "the {scope}'s cost budget is spent (${:.4} of `max_cost_usd` = ${:.4})",
        *micro_usd as f64 / 1e6,
        *max_micro_usd as f64 / 1e6
    )]
    Cost {
        /// `run` or `stage`.
        scope: &'static str,
        /// Spent, in millionths of a USD.
        micro_usd: u64,
        /// The cap, in millionths of a USD.
        max_micro_usd: u64,
    },
}

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

    /// `Err` saying which cap was reached, once one is.
    pub fn check(&self) -> Result<(), Spent> {
        if let Some(p) = &self.parent {
            p.check()?;
        }
        let scope = self.scope;
        let tokens = self.tokens.load(Ordering::SeqCst);
        let micro = self.micro_usd.load(Ordering::SeqCst);
        if let Some(max) = self.max_tokens.filter(|&m| tokens >= m) {
            return Err(Spent::Tokens { scope, spent: tokens, max });
        }
        if let Some(max) = self.max_micro_usd.filter(|&m| micro >= m) {
            return Err(Spent::Cost { scope, micro_usd: micro, max_micro_usd: max });
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
        assert_eq!(b.check().unwrap_err(), Spent::Tokens { scope: "run", spent: 120, max: 100 });
        assert!(b.check().unwrap_err().to_string().contains("120 of `max_tokens` = 100"));
        let c = Budget::new(None, Some(0.01));
        c.spend(1, 0.02);
        assert!(
            c.check().unwrap_err().to_string().contains("cost budget is spent ($0.0200 of `max_cost_usd` = $0.0100)")
        );
        assert!(Budget::default().check().is_ok());

        let run = std::sync::Arc::new(Budget::new(Some(1000), None));
        let stage = Budget::stage(run.clone(), Some(10), None);
        stage.spend(10, 0.0);
        assert!(stage.check().unwrap_err().to_string().contains("the stage's token budget"));
        assert_eq!(run.tokens(), 10, "stage spending counts against the run");
    }
}
