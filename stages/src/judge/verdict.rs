//! What the judge decides for one question, as pure functions of its answers: which
//! trajectories are kept, the gold answer they get, and why the others are dropped.

use super::Mode;
use crate::graders::{Gold, grade};
use crate::llm_rows::parse_tags;

/// The judge's reading of one question.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Verdict {
    /// Index (in the question's rows) of the trajectories kept.
    pub keep: Vec<usize>,
    /// The gold answer to write into kept rows.
    pub gold: Option<String>,
    /// `gold_match`, `consistent` or `rescued`.
    pub how: &'static str,
    /// The judge model's reasoning, when a model judged.
    pub reasoning: Option<String>,
    /// Why the other rows are dropped: (rule, detail).
    pub dropped: (String, String),
}

/// How a question is decided: the stage's mode and tolerance, the pipeline seed, the question.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rules<'a> {
    pub mode: Mode,
    pub tolerance: f64,
    pub seed: u64,
    pub question: &'a str,
}

impl Rules<'_> {
    /// The indices of `agreeing` (not empty) to keep under the mode; `best` is the judge's pick.
    pub fn select(&self, agreeing: &[usize], best: usize) -> Vec<usize> {
        match self.mode {
            Mode::KeepAllConsistent => agreeing.to_vec(),
            Mode::KeepBest => vec![if agreeing.contains(&best) { best } else { agreeing[0] }],
            Mode::KeepRandom => {
                let h = blake3::hash(format!("{}\0{}", self.seed, self.question).as_bytes());
                let pick = u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or_default());
                vec![agreeing[(pick % agreeing.len() as u64) as usize]]
            }
        }
    }

    /// A question with a gold answer: the trajectories whose answer agrees with it.
    pub fn against_gold(&self, answers: &[&str], gold: &str) -> Verdict {
        let gold_value = Gold::Value { value: gold.to_string(), tolerance: self.tolerance };
        let agreeing: Vec<usize> =
            (0..answers.len()).filter(|&i| grade(answers[i], None, &gold_value).correct).collect();
        let wrong: Vec<&str> = (0..answers.len()).filter(|i| !agreeing.contains(i)).map(|i| answers[i]).collect();
        let detail = format!("gold answer {gold:?}; answers that do not agree: {wrong:?}");
        if agreeing.is_empty() {
            return Verdict {
                keep: vec![],
                gold: None,
                how: "gold_match",
                reasoning: None,
                dropped: ("wrong_answer".into(), detail),
            };
        }
        let keep = self.select(&agreeing, agreeing[0]);
        let dropped = if wrong.is_empty() {
            ("not_selected".into(), format!("mode {:?}", self.mode))
        } else {
            ("wrong_answer".into(), detail)
        };
        Verdict { keep, gold: Some(gold.to_string()), how: "gold_match", reasoning: None, dropped }
    }

    /// A question judged by a model, from its parsed reply: consistent answers keep the mode's
    /// selection and the best answer becomes the gold; otherwise the question is dropped.
    pub fn on_reply(&self, answers: &[&str], (reasoning, consistent, best): (String, bool, usize)) -> Verdict {
        if consistent && (1..=answers.len()).contains(&best) {
            let all: Vec<usize> = (0..answers.len()).collect();
            return Verdict {
                keep: self.select(&all, best - 1),
                gold: Some(answers[best - 1].to_string()),
                how: "consistent",
                reasoning: Some(reasoning),
                dropped: ("not_selected".into(), format!("mode {:?}", self.mode)),
            };
        }
        let why = if consistent { format!("best answer {best} is out of range; ") } else { String::new() };
        Verdict {
            keep: vec![],
            gold: None,
            how: "consistent",
            reasoning: Some(reasoning.clone()),
            dropped: ("inconsistent".into(), format!("{why}{reasoning}")),
        }
    }
}

/// Answers too few to agree on: fewer than `min_answers` of the question's trajectories gave
/// one.
pub(super) fn too_few(answers: &[&str], min_answers: u32) -> Option<Verdict> {
    let given = answers.iter().filter(|a| !a.trim().is_empty()).count();
    (given < min_answers as usize).then(|| Verdict {
        keep: vec![],
        gold: None,
        how: "consistent",
        reasoning: None,
        dropped: (
            "too_few_answers".into(),
            format!("{given} of {} trajectories answered; agreement needs at least {min_answers}", answers.len()),
        ),
    })
}

impl Rules<'_> {
    /// A SQL question decided on its result tables (RECIPE section 8), without a model: the
    /// answers agree when one of their tables (the reference, the first that works) is met by
    /// every table, each holding the reference's columns with the same rows in any order,
    /// numbers within 1e-2. The reference's answer becomes the gold.
    pub fn on_tables(&self, answers: &[&str], tables: &[Option<&str>]) -> Verdict {
        let agree_with = |reference: &str| -> Vec<usize> {
            let gold = Gold::Table { csv: reference.to_string() };
            (0..tables.len()).filter(|&i| grade(answers[i], tables[i], &gold).correct).collect()
        };
        let reference = (0..tables.len()).find(|&r| tables[r].is_some_and(|t| agree_with(t).len() == tables.len()));
        match reference {
            Some(r) => {
                let all: Vec<usize> = (0..answers.len()).collect();
                Verdict {
                    keep: self.select(&all, r),
                    gold: Some(answers[r].to_string()),
                    how: "consistent",
                    reasoning: Some(format!(
                        "every result table holds the columns and rows of answer {}'s table",
                        r + 1
                    )),
                    dropped: ("not_selected".into(), format!("mode {:?}", self.mode)),
                }
            }
            None => {
                let missing = tables.iter().filter(|t| t.is_none()).count();
                let why = if missing > 0 {
                    format!("{missing} of {} answers name no result table; the tables do not agree", tables.len())
                } else {
                    format!("the {} result tables do not agree (columns or rows differ)", tables.len())
                };
                Verdict {
                    keep: vec![],
                    gold: None,
                    how: "consistent",
                    reasoning: Some(why.clone()),
                    dropped: ("inconsistent".into(), why),
                }
            }
        }
    }
}

/// The judge's reply: reasoning, whether the answers agree, the best (1-based).
pub(super) fn parse_reply(text: &str) -> Result<(String, bool, usize), String> {
    let [reasoning, consistent, best] =
        <[String; 3]>::try_from(parse_tags(text, &["reasoning", "consistent", "best"])?)
            .map_err(|_| "three tags expected".to_string())?;
    let consistent = match consistent.to_lowercase().as_str() {
        "yes" | "true" => true,
        "no" | "false" => false,
        other => return Err(format!("<consistent> must be yes or no, got {other:?}")),
    };
    let best = best
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<usize>()
        .map_err(|_| format!("<best> must be a number, got {best:?}"))?;
    Ok((reasoning, consistent, best))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(mode: Mode) -> Rules<'static> {
        Rules { mode, tolerance: 0.03, seed: 7, question: "How many?" }
    }

    #[test]
    fn each_mode_keeps_what_it_says() {
        assert_eq!(rules(Mode::KeepAllConsistent).select(&[0, 2, 3], 2), [0, 2, 3]);
        assert_eq!(rules(Mode::KeepBest).select(&[0, 2, 3], 2), [2]);
        assert_eq!(rules(Mode::KeepBest).select(&[0, 3], 2), [0], "the best must agree, else the first");
        let random = rules(Mode::KeepRandom).select(&[0, 2, 3], 2);
        assert_eq!(random.len(), 1);
        assert!([0, 2, 3].contains(&random[0]));
        assert_eq!(random, rules(Mode::KeepRandom).select(&[0, 2, 3], 2), "seeded: the same pick every time");
        let picks: std::collections::BTreeSet<usize> =
            (0..40).map(|seed| Rules { seed, ..rules(Mode::KeepRandom) }.select(&[0, 1, 2], 0)[0]).collect();
        assert_eq!(picks.len(), 3, "other seeds pick others");
    }

    #[test]
    fn gold_keeps_the_agreeing_answers_and_names_the_wrong_ones() {
        let v = rules(Mode::KeepAllConsistent).against_gold(&["42", "40", "42.5"], "42");
        assert_eq!(v.keep, [0, 2], "within 3%, not 5%");
        assert_eq!(v.gold.as_deref(), Some("42"));
        assert_eq!(v.dropped.0, "wrong_answer");
        assert!(v.dropped.1.contains("\"40\""), "{}", v.dropped.1);
        let none = rules(Mode::KeepAllConsistent).against_gold(&["1", "2"], "42");
        assert!(none.keep.is_empty() && none.gold.is_none());
        let strict = rules(Mode::KeepAllConsistent).against_gold(&["Yes and no", "yes.", "42 rows, not Yes"], "Yes");
        assert_eq!(strict.keep, [1], "the whole answer must be the gold, not contain it");
        let last = rules(Mode::KeepAllConsistent).against_gold(&["42 of the 50 rows", "out of 50 rows, 42"], "42");
        assert_eq!(last.keep, [1], "the final number is the answer");
        let all = rules(Mode::KeepBest).against_gold(&["42", "42"], "42");
        assert_eq!((all.keep, all.dropped.0.as_str()), (vec![0], "not_selected"));
    }

    #[test]
    fn a_reply_decides_by_consistency_and_a_best_in_range() {
        let r = rules(Mode::KeepAllConsistent);
        let v = r.on_reply(&["7", "7.0"], ("same".into(), true, 2));
        assert_eq!((v.keep, v.gold.as_deref(), v.how), (vec![0, 1], Some("7.0"), "consistent"));
        let out_of_range = r.on_reply(&["7", "7"], ("same".into(), true, 3));
        assert!(out_of_range.keep.is_empty() && out_of_range.dropped.1.starts_with("best answer 3 is out of range"));
        let inconsistent = r.on_reply(&["7", "8"], ("they differ".into(), false, 1));
        assert_eq!(inconsistent.dropped, ("inconsistent".to_string(), "they differ".to_string()));
    }

    #[test]
    fn agreement_needs_enough_answers() {
        assert!(too_few(&["7", "7", "7"], 2).is_none());
        let one = too_few(&["7", "", "  "], 2).expect("one answer is not agreement");
        assert_eq!(one.dropped.0, "too_few_answers");
        assert_eq!(one.dropped.1, "1 of 3 trajectories answered; agreement needs at least 2");
        assert!(too_few(&["7", "8"], 3).is_some());
    }

    #[test]
    fn sql_answers_agree_on_their_tables() {
        let r = rules(Mode::KeepAllConsistent);
        let (narrow, wide) = ("city,n\nLyon,3\nParis,10\n", "n,city,extra\n10.001,paris,x\n3,Lyon,y\n");
        let v = r.on_tables(&["a.csv", "b.csv"], &[Some(wide), Some(narrow)]);
        assert_eq!((v.keep, v.gold.as_deref()), (vec![0, 1], Some("b.csv")), "the narrower table is the reference");
        let other = "city,n\nLyon,3\nParis,11\n";
        let v = r.on_tables(&["a.csv", "b.csv"], &[Some(narrow), Some(other)]);
        assert!(v.keep.is_empty() && v.dropped.0 == "inconsistent", "{v:?}");
        let v = r.on_tables(&["a.csv", "no table"], &[Some(narrow), None]);
        assert!(v.keep.is_empty() && v.dropped.1.starts_with("1 of 2 answers name no result table"));
    }

    #[test]
    fn replies_parse_or_say_why_not() {
        let ok = "<reasoning>r</reasoning><consistent>Yes</consistent><best>[2]</best>";
        assert_eq!(parse_reply(ok).unwrap(), ("r".to_string(), true, 2));
        assert!(parse_reply("<reasoning>r</reasoning><consistent>maybe</consistent><best>1</best>").is_err());
        assert!(parse_reply("<reasoning>r</reasoning><consistent>no</consistent><best>x</best>").is_err());
    }
}
