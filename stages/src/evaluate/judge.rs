//! The LLM judge of open answers (the recipe's judge: same finding, numbers within 3%), for
//! items whose gold only a model can compare with an answer (DiscoveryBench hypotheses,
//! TableBench's descriptive questions). Its verdict and reasoning become the row's.

use kiln_llm::Message;
use kiln_pipeline::stage::{CheckCx, Problem, StageCx};
use kiln_pipeline::{Error, Result};

use crate::llm_rows::{Model, RowRequest, complete_rows, parse_tags};
use crate::templates::{Templates, check_template};

/// The variables a judge template gets.
pub const VARIABLES: &[&str] = &["question", "reference", "answer"];

/// A resolved judge: its model and template.
#[derive(Debug)]
pub struct Judge {
    /// The judge model.
    pub model: Model,
    template: String,
    templates: Templates,
}

/// One answer to judge.
pub struct Ask<'a> {
    /// The row the verdict is for.
    pub row_id: &'a str,
    /// The question as the agent read it.
    pub question: &'a str,
    /// The reference answer.
    pub reference: &'a str,
    /// The agent's answer.
    pub answer: &'a str,
}

/// A judge's verdict.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    /// The answer is right.
    pub correct: bool,
    /// The judge's reasoning.
    pub reasoning: String,
}

fn parse(reply: &str) -> Result<Verdict, String> {
    let [reasoning, correct] =
        <[String; 2]>::try_from(parse_tags(reply, &["reasoning", "correct"])?).unwrap_or_default();
    let correct = match correct.to_lowercase().trim_end_matches('.') {
        "yes" => true,
        "no" => false,
        other => return Err(format!("<correct> is {other:?}, not yes or no")),
    };
    Ok(Verdict { correct, reasoning })
}

impl Judge {
    /// The judge `model` with `template`, or their problems at the stage's `judge` and
    /// `judge_template` keys.
    pub fn build(cx: &CheckCx, model: &str, template: &str, problems: &mut Vec<Problem>) -> Option<Judge> {
        let model = Model::resolve(cx, model)
            .map_err(|p| problems.push(Problem::new("judge", p.message).help("`judge` names a `[models]` table")))
            .ok();
        let templates = check_template(cx, template, VARIABLES, "judge")
            .map_err(|p| problems.push(Problem { at: vec!["judge_template".into()], ..p }))
            .ok();
        Some(Judge { model: model?, template: template.to_string(), templates: templates? })
    }

    /// The template files, for the fingerprint.
    pub fn files(&self) -> Vec<kiln_pipeline::stage::FileDep> {
        self.templates.files()
    }

    /// The verdicts on `asks`, in order (`None` where the judge's reply never parsed), and the
    /// judge's counters.
    pub async fn judge(
        &self,
        cx: &StageCx,
        asks: &[Ask<'_>],
    ) -> Result<(Vec<Option<Verdict>>, std::collections::BTreeMap<String, u64>)> {
        let mut requests = Vec::new();
        for a in asks {
            let vars = serde_json::json!({"question": a.question, "reference": a.reference, "answer": a.answer});
            let prompt = self.templates.render(&self.template, vars).map_err(|e| Error::stage(&cx.name, e))?;
            requests.push(RowRequest {
                row_id: a.row_id.to_string(),
                messages: vec![Message::new("user", prompt)],
                sample: 0,
            });
        }
        let client = self.model.client(cx)?;
        let (replies, _rejections, counters) =
            complete_rows(cx, &client, requests, crate::llm_rows::default_parse_retries(), parse).await?;
        let counters = counters.into_iter().map(|(k, v)| (format!("judge_{k}"), v)).collect();
        Ok((replies.into_iter().map(|r| r.map(|r| r.value)).collect(), counters))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_to_verdicts() {
        let v = parse("<reasoning>same effect, 0.36 vs 0.3596</reasoning><correct>Yes</correct>").unwrap();
        assert_eq!(v, Verdict { correct: true, reasoning: "same effect, 0.36 vs 0.3596".into() });
        assert!(!parse("<reasoning>opposite sign</reasoning><correct>no</correct>").unwrap().correct);
        assert_eq!(
            parse("<reasoning>x</reasoning><correct>maybe</correct>").unwrap_err(),
            "<correct> is \"maybe\", not yes or no"
        );
        assert!(parse("yes").is_err());
    }
}
