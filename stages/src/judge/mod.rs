//! `judge`: the self-consistency filter (RECIPE section 6), which the paper's ablation found
//! mattered most.
//!
//! Trajectories are grouped by question (their first parent), and judged a chunk of whole
//! questions at a time ([`crate::grouped`]), so memory holds a chunk, not the input. A question whose rows carry a
//! gold answer (from `programmatic`) is checked against it by the graders' value rule
//! ([`crate::graders`]): the answer's final number within `tolerance`, or its whole text equal
//! after normalisation. Any other question first needs `min_answers` (default 2) answers, since
//! one answer agrees with nothing (`too_few_answers`). A SQL question is then decided on its
//! result tables, without a model (RECIPE section 8): the answers agree when every result CSV
//! holds the columns of one of them (the reference) with the same rows in any order, numbers
//! within 1e-2. Any other question needs a judge model: one call per question over its N final
//! answers (`judge_consistency.j2`), whose reply gives its reasoning, whether the answers agree
//! (same meaning, numbers within 3%, complete) and the best one; a consistent question's best
//! answer becomes the gold answer of its rows. Inconsistent questions, and answers that miss
//! the gold, are rejected with the judge's reasoning.
//!
//! Rescue (optional): an inconsistent question (or one with too few answers) goes back to the
//! teacher with the judge's reasoning as a critique (the teacher reads it; the trajectories kept
//! do not hold it); the teacher samples N (at least `min_answers`) new trajectories through the
//! agent loop ([`crate::agent`], cached the same way), with the rescue's own `max_turns`,
//! `template`, `sandbox`, `isolation` and `parallel` (the keys and defaults of a `trajectories`
//! stage). New trajectories pass the rule-based filters the first ones passed on their way
//! here: the format check, and the length and language rules (`rescue.length` and
//! `rescue.language`, with the keys and defaults of those filter kinds); each one refused is in
//! the ledger as `judge:rescue_<filter>:<rule>`. The rest are judged again, up to `rounds` times. A
//! rescued question keeps its new trajectories; its first ones go to the ledger. A rescue
//! teacher at temperature 0 is a check error: its samples would be one sample repeated.
//!
//! Which of the agreeing trajectories are kept: `keep_all_consistent` (default; best in the
//! paper's ablation), `keep_best` (the judge's best, or the first correct one), or
//! `keep_random` (one, chosen by the pipeline seed).
//!
//! ```toml
//! [stages.judged]
//! kind = "judge"
//! inputs = ["clean"]
//! model = "judge"             # needed for questions without a gold answer
//! mode = "keep_all_consistent"
//! min_answers = 2
//! rescue = { teacher = "teacher", rounds = 2, length = { max_answer_tokens = 1024 } }   # optional
//! ```

mod rescue;
mod verdict;

pub use rescue::Rescue;
use rescue::Rescuing;
use std::collections::BTreeMap;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use kiln_llm::Message;
use kiln_pipeline::rows::to_batch;
use kiln_pipeline::stage::{
    CheckCx, Config, Estimate, FileDep, Input, InputSchema, Output, Problem, Rejection, Stage, StageCx,
};
use kiln_pipeline::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::agent::{Keys, Trajectory};
use crate::families::{Judged, TRAJECTORY, verdict_schema};
use crate::grouped::{Grouped, Groups};
use crate::llm_rows::{Model, RowRequest, complete_rows, estimate_rows};
use crate::templates::{Templates, check_template};
use verdict::{Rules, Verdict, parse_reply};

/// Which agreeing trajectories a question keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every trajectory whose answer agrees.
    KeepAllConsistent,
    /// Only the best one.
    KeepBest,
    /// One agreeing trajectory, chosen by the pipeline seed.
    KeepRandom,
}

/// Parameters of a `judge` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Judge {
    /// The judge model, a `[models.<name>]` table; needed when some question has no gold answer.
    #[serde(default)]
    pub model: Option<String>,
    /// Which agreeing trajectories to keep. Default: `keep_all_consistent`.
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// Relative tolerance when a numeric answer is checked against a gold answer. Default: 0.03.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// Judge prompt template. Default: `judge_consistency.j2`.
    #[serde(default = "default_template")]
    pub template: String,
    /// Extra requests when the judge's reply does not parse. Default: 2.
    #[serde(default = "crate::llm_rows::default_parse_retries")]
    pub max_parse_retries: u32,
    /// Answers a question needs before agreement among them counts (one answer agrees with
    /// nothing). Default: 2.
    #[serde(default = "default_min_answers")]
    pub min_answers: u32,
    /// Re-sample inconsistent questions with the judge's critique. Default: no rescue.
    #[serde(default)]
    pub rescue: Option<Rescue>,
}

fn default_min_answers() -> u32 {
    2
}

fn default_mode() -> Mode {
    Mode::KeepAllConsistent
}
fn default_tolerance() -> f64 {
    0.03
}
fn default_template() -> String {
    "judge_consistency.j2".into()
}

/// A question's trajectories, in sample order.
type Group = Vec<Trajectory>;

fn answer(t: &Trajectory) -> &str {
    t.final_answer.as_deref().unwrap_or("")
}

/// The final answers of a question's trajectories, in sample order.
fn answers(group: &Group) -> Vec<&str> {
    group.iter().map(answer).collect()
}

impl Config for Judge {
    fn build(&self, cx: &CheckCx, problems: &mut Vec<Problem>) -> Option<Box<dyn Stage>> {
        let model = self.model.as_ref().and_then(|m| Model::resolve(cx, m).map_err(|p| problems.push(p)).ok());
        if !(0.0..1.0).contains(&self.tolerance) {
            problems.push(Problem::new(
                "tolerance",
                format!("`tolerance` is relative, between 0 and 1; got {}", self.tolerance),
            ));
        }
        let templates =
            check_template(cx, &self.template, &["question", "answers"], "judge").map_err(|p| problems.push(p)).ok();
        if !(1..=crate::llm_rows::MAX_SAMPLES).contains(&self.min_answers) {
            problems.push(Problem::new(
                "min_answers",
                format!(
                    "`min_answers` must be between 1 and {}, got {}",
                    crate::llm_rows::MAX_SAMPLES,
                    self.min_answers
                ),
            ));
        }
        let mut rescue = None;
        if let Some(r) = &self.rescue {
            if self.model.is_none() {
                problems.push(Problem::new("rescue", "rescue needs a judge `model` to judge the new answers"));
            }
            let keys = Keys { prefix: "rescue.", teacher: "rescue.teacher", kind: "trajectories" };
            let agent = r.agent().build(cx, keys, problems);
            // A rescue samples every question again, several times (at least `min_answers`).
            if let Some(teacher) =
                agent.as_ref().and_then(|a| a.teacher()).filter(|m| m.config.temperature == Some(0.0))
            {
                problems.push(
                    Problem::new(
                        "rescue.teacher",
                        format!("a rescue at temperature 0 (model `{}`) samples one answer repeated", teacher.name),
                    )
                    .help(format!("set `temperature` above 0 in `[models.{}]`", teacher.name)),
                );
            }
            let length = r.length.measuring(cx, "rescue.length.").map_err(|p| problems.push(p)).ok();
            rescue = Some(Rescuing { rounds: r.rounds, agent: agent?, length: length?, language: r.language.clone() });
        }
        match templates {
            Some(templates) => Some(Box::new(Judging { params: self.clone(), model, templates, rescue })),
            _ => None,
        }
    }
}

/// A built `judge` stage.
#[derive(Debug)]
struct Judging {
    params: Judge,
    /// The judge model, if any.
    model: Option<Model>,
    templates: Templates,
    /// Rescue rounds, the agent that samples them and the filters they pass.
    rescue: Option<Rescuing>,
}

impl Judging {
    /// The judge call for the question `id` and its trajectories' answers.
    fn judge_request(&self, id: &str, group: &Group) -> Result<RowRequest, crate::StageError> {
        let answers: Vec<&str> = group.iter().map(answer).collect();
        let vars = serde_json::json!({"question": group[0].about.question, "answers": answers});
        let prompt = self.templates.render(&self.params.template, vars)?;
        Ok(RowRequest { row_id: id.to_string(), messages: vec![Message::new("user", prompt)], sample: 0 })
    }

    /// How this stage decides `question`.
    fn rules<'q>(&self, seed: u64, question: &'q str) -> Rules<'q> {
        Rules { mode: self.params.mode, tolerance: self.params.tolerance, seed, question }
    }
}

#[async_trait]
impl Stage for Judging {
    fn models(&self) -> Vec<String> {
        let teacher = self.rescue.as_ref().and_then(|r| r.agent.teacher());
        self.model.iter().chain(teacher).map(|m| m.name.clone()).collect()
    }

    fn seeded(&self) -> bool {
        self.params.mode == Mode::KeepRandom
    }

    fn files(&self, _cx: &CheckCx) -> Vec<FileDep> {
        let mut files = self.templates.files();
        if let Some(rescue) = &self.rescue {
            files.extend(rescue.agent.files());
            files.extend(rescue.length.files_used());
        }
        files
    }

    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        crate::filters::filter_schema("judge", inputs, &[])?;
        Ok(verdict_schema())
    }

    async fn estimate(&self, cx: &StageCx, inputs: &[Input]) -> Result<Option<Estimate>> {
        let Some(model) = &self.model else { return Ok(None) };
        let mut requests = Vec::new();
        let mut questions = questions(&inputs[0])?;
        while let Some(chunk) = questions.next_chunk(ROWS_AT_ONCE)? {
            requests.extend(self.triage(cx, &by_question(chunk))?.1);
        }
        estimate_rows(cx, &model.config, &requests, 1).map(Some)
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        let client = self.model.as_ref().map(|m| m.client(cx)).transpose()?;
        let mut out = Output::default();
        let mut kept = 0;
        let mut questions = questions(&inputs[0])?;
        while let Some(chunk) = questions.next_chunk(ROWS_AT_ONCE)? {
            let rows = self.judge_chunk(cx, client.as_deref(), by_question(chunk), &mut out).await?;
            kept += rows.len() as u64;
            cx.emit(to_batch(&verdict_schema(), &rows)?)?;
        }
        out.counters.insert("kept".into(), kept);
        Ok(out)
    }
}

/// Trajectories judged at once (whole questions): what the judge holds in memory, and the
/// questions whose judge calls run together.
const ROWS_AT_ONCE: usize = 4096;

/// A question's id, per trajectory of `batch`: its first parent.
fn question_ids(_: &str, batch: &RecordBatch) -> Result<Vec<String>> {
    Ok(kiln_pipeline::rows::first_parents(batch)?.into_iter().map(|(_, question)| question).collect())
}

/// The trajectories of `batch`, each with its question's id.
fn trajectories(stage: &str, batch: RecordBatch) -> Result<Vec<(String, Trajectory)>> {
    Ok(TRAJECTORY
        .rows::<Trajectory>(stage, &[batch])?
        .into_iter()
        .map(|t| (t.parent_ids.first().cloned().unwrap_or_else(|| t.row_id.clone()), t))
        .collect())
}

/// The trajectories of `input` by question, complete groups at a time, samples in order.
fn questions(input: &Input) -> Result<Grouped<Trajectory>> {
    Grouped::read(input, question_ids, trajectories)
}

/// A chunk of complete questions, by id, samples in order.
fn by_question(chunk: Groups<Trajectory>) -> BTreeMap<String, Group> {
    chunk
        .into_iter()
        .map(|(id, mut group)| {
            group.sort_by_key(|t| t.sample);
            (id, group)
        })
        .collect()
}

impl Judging {
    /// Judges the questions of `groups` (complete groups): their kept rows, with the rejections
    /// and counters added to `out`.
    async fn judge_chunk(
        &self,
        cx: &StageCx,
        client: Option<&kiln_llm::Client>,
        groups: BTreeMap<String, Group>,
        out: &mut Output,
    ) -> Result<Vec<Judged>> {
        let fail = |e: String| Error::stage(&cx.name, e);
        let (mut verdicts, requests) = self.triage(cx, &groups)?;
        for (id, group) in &groups {
            if let Some(gold) = &group[0].about.gold_answer {
                let rules = self.rules(cx.seed, &group[0].about.question);
                verdicts.insert(id.clone(), rules.against_gold(&answers(group), gold));
            }
        }
        let mut rescued: BTreeMap<String, (Group, u32)> = BTreeMap::new();
        // Why each question was first dropped, for the ledger of those a rescue replaces.
        let mut dropped_first: BTreeMap<String, String> = BTreeMap::new();
        if let Some(client) = client {
            let asked: BTreeMap<String, &Group> =
                requests.iter().map(|r| (r.row_id.clone(), &groups[&r.row_id])).collect();
            verdicts.extend(self.consistency(cx, client, requests, &asked, out).await?);
            dropped_first = verdicts
                .iter()
                .filter(|(_, v)| v.keep.is_empty())
                .map(|(id, v)| (id.clone(), v.dropped.0.clone()))
                .collect();
            if let Some(rescue) = &self.rescue {
                rescued = self.rescue(cx, rescue, client, &groups, &mut verdicts, out).await?;
            }
        } else if !requests.is_empty() {
            return Err(fail(format!(
                "{} questions have no gold answer: set `model` to a judge model for the self-consistency check",
                requests.len()
            )));
        }

        let mut rows = Vec::new();
        for (id, mut group) in groups {
            let Some(v) = verdicts.get(&id) else { continue };
            if let Some((new, round)) = rescued.remove(&id) {
                for row in &group {
                    out.rejections.push(Rejection {
                        row_id: row.row_id.clone(),
                        reason: "judge:superseded".into(),
                        detail: format!(
                            "answer {:?}: {}; replaced by the trajectories of rescue round {round}",
                            answer(row),
                            dropped_first.get(&id).map(String::as_str).unwrap_or("")
                        ),
                    });
                }
                group = new;
            }
            *out.counters
                .entry(format!("questions_{}", if v.keep.is_empty() { v.dropped.0.as_str() } else { "kept" }))
                .or_default() += 1;
            for (i, mut row) in group.into_iter().enumerate() {
                if v.keep.contains(&i) {
                    row.about.gold_answer = v.gold.clone();
                    rows.push(Judged {
                        trajectory: row,
                        judge_verdict: v.how.into(),
                        judge_reasoning: v.reasoning.clone(),
                    });
                } else {
                    out.rejections.push(Rejection {
                        row_id: row.row_id.clone(),
                        reason: format!("judge:{}", v.dropped.0),
                        detail: format!("answer {:?}: {}", answer(&row), v.dropped.1),
                    });
                }
            }
        }
        Ok(rows)
    }
}

impl Judging {
    /// One judge call per request (a question and its answers in `groups`); the verdicts.
    async fn consistency(
        &self,
        cx: &StageCx,
        client: &kiln_llm::Client,
        requests: Vec<RowRequest>,
        groups: &BTreeMap<String, &Group>,
        out: &mut Output,
    ) -> Result<BTreeMap<String, Verdict>> {
        let (replies, rejections, counters) =
            complete_rows(cx, client, requests.clone(), self.params.max_parse_retries, parse_reply).await?;
        for (name, n) in counters {
            *out.counters.entry(name).or_default() += n;
        }
        let mut verdicts = BTreeMap::new();
        for r in rejections {
            for row in groups[&r.row_id].iter() {
                out.rejections.push(Rejection {
                    row_id: row.row_id.clone(),
                    reason: "judge:unparseable".into(),
                    detail: r.detail.clone(),
                });
            }
        }
        for (request, reply) in requests.iter().zip(replies) {
            let Some(reply) = reply else { continue };
            let group = groups[&request.row_id];
            let verdict = self.rules(cx.seed, &group[0].about.question).on_reply(&answers(group), reply.value);
            verdicts.insert(request.row_id.clone(), verdict);
        }
        Ok(verdicts)
    }

    /// The questions of `groups` without a gold answer: those decided without a model (too few
    /// answers; SQL tasks, on their result tables), and one judge request for each other.
    fn triage(
        &self,
        cx: &StageCx,
        groups: &BTreeMap<String, Group>,
    ) -> Result<(BTreeMap<String, Verdict>, Vec<RowRequest>)> {
        let (mut decided, mut requests) = (BTreeMap::new(), Vec::new());
        for (id, group) in groups.iter().filter(|(_, g)| g[0].about.gold_answer.is_none()) {
            let answers = answers(group);
            if let Some(v) = verdict::too_few(&answers, self.params.min_answers) {
                decided.insert(id.clone(), v);
            } else if group[0].about.format == "sqlite" {
                let tables: Vec<Option<&str>> = group.iter().map(|t| t.result_csv.as_deref()).collect();
                decided.insert(id.clone(), self.rules(cx.seed, &group[0].about.question).on_tables(&answers, &tables));
            } else {
                requests.push(self.judge_request(id, group).map_err(|e| Error::stage(&cx.name, e))?);
            }
        }
        Ok((decided, requests))
    }
}
