//! The RL reward of RECIPE section 8, from the same graders as evaluation: a right answer
//! earns 1.0 when it is at most 256 characters, falling linearly to 0.5 at 1,024 and staying
//! there; a wrong answer in the protocol's format earns 0; a trajectory with a void turn (one
//! that neither ran code nor answered) earns -0.1. Trajectories with a void turn, and those that
//! ran out of turns without answering, carry no policy-gradient loss ([`Outcome::masked`]):
//! their reward only counts in their group's baseline.
//!
//! The reward is always computed against the rollout's own item's gold.

use super::{Gold, grade};
use crate::agent::Trajectory;

/// How a rollout ended, as the reward sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The answer is right.
    Right {
        /// Its length in characters.
        answer_chars: usize,
    },
    /// The answer is wrong, in a valid format.
    Wrong,
    /// Every turn was valid, but the turns ran out before an answer.
    NoAnswer,
    /// A turn broke the protocol (a void turn).
    BadFormat,
}

impl Outcome {
    /// The outcome of trajectory `t` for an item whose gold is `gold`.
    pub fn of(t: &Trajectory, gold: &Gold) -> Outcome {
        if t.steps.iter().any(|s| s.action == "invalid") {
            return Outcome::BadFormat;
        }
        match &t.final_answer {
            None => Outcome::NoAnswer,
            Some(answer) if grade(answer, t.result_csv.as_deref(), gold).correct => {
                Outcome::Right { answer_chars: answer.chars().count() }
            }
            Some(_) => Outcome::Wrong,
        }
    }

    /// The scalar reward.
    pub fn reward(&self) -> f64 {
        match self {
            Outcome::Right { answer_chars } => length_factor(*answer_chars),
            Outcome::Wrong | Outcome::NoAnswer => 0.0,
            Outcome::BadFormat => -0.1,
        }
    }

    /// Whether the rollout's tokens are left out of the policy-gradient loss.
    pub fn masked(&self) -> bool {
        matches!(self, Outcome::NoAnswer | Outcome::BadFormat)
    }

    /// Whether the answer is right.
    pub fn correct(&self) -> bool {
        matches!(self, Outcome::Right { .. })
    }
}

/// The length shaping of a right answer: 1 up to 256 characters, linear down to 0.5 at 1,024.
pub fn length_factor(chars: usize) -> f64 {
    match chars {
        0..=256 => 1.0,
        257..=1024 => 1.0 - 0.5 * (chars - 256) as f64 / (1024.0 - 256.0),
        _ => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{About, Step};

    fn rollout(answer: Option<&str>, actions: &[&str]) -> Trajectory {
        let about = About { question: "q".into(), path: "t.csv".into(), ..About::default() };
        let mut t = Trajectory::opening("r".into(), "p".into(), about, 0, "policy".into(), Vec::new());
        t.final_answer = answer.map(str::to_string);
        t.steps = actions
            .iter()
            .map(|a| Step { action: a.to_string(), status: None, teacher_ms: 0.0, exec_ms: 0.0, truncated: false })
            .collect();
        t
    }

    #[test]
    fn each_branch_has_its_reward() {
        let gold = Gold::Value { value: "42".into(), tolerance: 0.03 };
        let right = Outcome::of(&rollout(Some("42"), &["code", "answer"]), &gold);
        assert_eq!((right.reward(), right.masked()), (1.0, false));
        let wrong = Outcome::of(&rollout(Some("40"), &["answer"]), &gold);
        assert_eq!((wrong, Outcome::Wrong.reward()), (Outcome::Wrong, 0.0));
        let void = Outcome::of(&rollout(Some("42"), &["invalid", "answer"]), &gold);
        assert_eq!((void.reward(), void.masked()), (-0.1, true), "a void turn anywhere is a bad format");
        let ran_out = Outcome::of(&rollout(None, &["code", "code"]), &gold);
        assert_eq!((ran_out.reward(), ran_out.masked()), (0.0, true));
        let long = "42 ".to_string() + &"x".repeat(637);
        assert_eq!(Outcome::of(&rollout(Some(&long), &["answer"]), &gold).reward(), 0.75);
    }

    #[test]
    fn long_right_answers_earn_less() {
        assert_eq!(length_factor(0), 1.0);
        assert_eq!(length_factor(256), 1.0);
        assert!((length_factor(640) - 0.75).abs() < 1e-12);
        assert_eq!(length_factor(1024), 0.5);
        assert_eq!(length_factor(100_000), 0.5);
    }
}
