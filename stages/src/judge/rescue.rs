//! Rescue rounds: inconsistent questions go back to the teacher with the judge's critique (which
//! only the teacher reads), through the agent loop, and are judged again.

use std::collections::BTreeMap;

use kiln_pipeline::Result;
use kiln_pipeline::stage::{Output, StageCx};
use serde::{Deserialize, Serialize};

use kiln_pipeline::stage::Rejection;

use super::verdict::Verdict;
use super::{Group, Judging};
use crate::agent::{AgentSettings, AgentSetup, Task, TeacherSpec, Trajectory};
use crate::families::Turns;
use crate::filters::format::check_trajectory;
use crate::filters::language::LanguageFilter;
use crate::filters::length::{LengthFilter, Measuring};

crate::with_agent_keys! {
    /// How inconsistent questions are rescued: the agent's keys are those of a `trajectories`
    /// stage, with the same defaults.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Rescue {
        /// The teacher model, a `[models.<name>]` table.
        pub teacher: String,
        /// Rounds of critique, re-sampling and judging. Default: 1.
        #[serde(default = "one")]
        pub rounds: u32,
        /// The length rules new trajectories must pass, as a `length_filter` stage's keys.
        /// Default: that kind's defaults.
        #[serde(default)]
        pub length: LengthFilter,
        /// The language rules new trajectories must pass, as a `language_filter` stage's keys.
        /// Default: that kind's defaults.
        #[serde(default)]
        pub language: LanguageFilter,
    }
}

/// A built rescue: its rounds, the agent that samples them, and the filters new trajectories
/// pass (format, length and language, as the first ones did on their way to the judge).
#[derive(Debug)]
pub(super) struct Rescuing {
    pub rounds: u32,
    pub agent: AgentSetup,
    pub length: Measuring,
    pub language: LanguageFilter,
}

impl Rescuing {
    /// Why trajectory `t` may not be kept, by the rule-based filters' rules: the filter
    /// (`format`, `length`, `language`), its rule and the detail.
    fn refusal(&self, t: &Trajectory) -> Option<(&'static str, String, String)> {
        let turns = Turns {
            question: Some(t.about.question.clone()),
            messages: t.messages.clone(),
            final_answer: t.final_answer.clone(),
            end_reason: Some(t.end_reason.clone()),
            teacher_system: None,
        };
        let (kind, refusal) = check_trajectory(&t.messages, Some(&t.end_reason))
            .map_err(|r| ("format", r))
            .and_then(|()| self.length.check(&turns).map_err(|r| ("length", r)))
            .and_then(|()| self.language.check(&turns).map_err(|r| ("language", r)))
            .err()?;
        Some((kind, refusal.0, refusal.1))
    }
}

impl Rescue {
    /// The agent that samples the new trajectories.
    pub(super) fn agent(&self) -> AgentSettings {
        self.agent_settings(TeacherSpec::Model(self.teacher.clone()))
    }
}

fn one() -> u32 {
    1
}

impl Judging {
    /// Rescue rounds for the inconsistent questions among `verdicts`: new trajectories with the
    /// critique, judged again. Returns the rescued questions' new trajectories (and round),
    /// and updates their verdicts.
    pub(super) async fn rescue(
        &self,
        cx: &StageCx,
        rescue: &Rescuing,
        client: &kiln_llm::Client,
        groups: &BTreeMap<String, Group>,
        verdicts: &mut BTreeMap<String, Verdict>,
        out: &mut Output,
    ) -> Result<BTreeMap<String, (Group, u32)>> {
        let n = (groups.values().map(Vec::len).max().unwrap_or(1) as u32).max(self.params.min_answers);
        let agent = rescue.agent.start(cx).await?;
        let mut rescued = BTreeMap::new();
        for round in 1..=rescue.rounds {
            let pending: Vec<(String, String)> = verdicts
                .iter()
                .filter(|(id, v)| {
                    v.keep.is_empty()
                        && ["inconsistent", "too_few_answers"].contains(&v.dropped.0.as_str())
                        && !rescued.contains_key(*id)
                })
                .map(|(id, v)| (id.clone(), v.reasoning.clone().unwrap_or_else(|| v.dropped.1.clone())))
                .collect();
            if pending.is_empty() {
                break;
            }
            *out.counters.entry("rescue_attempts".into()).or_default() += pending.len() as u64;
            let tasks: Vec<Task> = pending.iter().map(|(id, why)| Task::again(&groups[id][0], round, why)).collect();
            let samples = agent.sample(&tasks, n).await;
            let mut fresh: BTreeMap<String, Group> = BTreeMap::new();
            for (i, result) in samples.into_iter().enumerate() {
                let id = &pending[i / n as usize].0;
                match result? {
                    Ok(t) => match rescue.refusal(&t) {
                        None => fresh.entry(id.clone()).or_default().push(t),
                        Some((filter, rule, detail)) => {
                            *out.counters.entry(format!("rescue_dropped_{filter}_{rule}")).or_default() += 1;
                            let reason = format!("judge:rescue_{filter}:{rule}");
                            out.rejections.push(Rejection { row_id: t.row_id, reason, detail });
                        }
                    },
                    Err(r) => out.rejections.push(r),
                }
            }
            let (decided, requests) = self.triage(cx, &fresh)?;
            let asked: BTreeMap<String, &Group> = fresh.iter().map(|(id, g)| (id.clone(), g)).collect();
            let mut judged = decided;
            judged.extend(self.consistency(cx, client, requests, &asked, out).await?);
            for (id, verdict) in judged {
                if verdict.keep.is_empty() {
                    verdicts.insert(id, verdict);
                } else {
                    *out.counters.entry("rescued".into()).or_default() += 1;
                    verdicts.insert(id.clone(), Verdict { how: "rescued", ..verdict });
                    rescued.insert(id.clone(), (fresh[&id].clone(), round));
                }
            }
        }
        out.counters.insert(format!("rescue_isolation_{}", agent.isolation()), 1);
        for (name, n) in agent.counters() {
            *out.counters.entry(format!("rescue_{name}")).or_default() += n;
        }
        Ok(rescued)
    }
}
