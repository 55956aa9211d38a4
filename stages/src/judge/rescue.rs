//! Rescue rounds: inconsistent questions go back to the teacher with the judge's critique (which
//! only the teacher reads), through the agent loop, and are judged again.

use std::collections::BTreeMap;

use kiln_pipeline::stage::{Output, StageCx};
use kiln_pipeline::{Error, Result};
use serde::{Deserialize, Serialize};

use super::verdict::Verdict;
use super::{Group, Judging};
use crate::agent::{AgentSettings, AgentSetup, Task, TeacherSpec};

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
        (rounds, agent): &(u32, AgentSetup),
        client: &kiln_llm::Client,
        groups: &BTreeMap<String, Group>,
        verdicts: &mut BTreeMap<String, Verdict>,
        out: &mut Output,
    ) -> Result<BTreeMap<String, (Group, u32)>> {
        let n = groups.values().map(Vec::len).max().unwrap_or(1) as u32;
        let agent = agent.start(cx).await?;
        let mut rescued = BTreeMap::new();
        for round in 1..=*rounds {
            let pending: Vec<(String, String)> = verdicts
                .iter()
                .filter(|(id, v)| v.keep.is_empty() && v.dropped.0 == "inconsistent" && !rescued.contains_key(*id))
                .map(|(id, v)| (id.clone(), v.reasoning.clone().unwrap_or_default()))
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
                    Ok(t) => match crate::filters::format::check_trajectory(&t.messages, Some(&t.end_reason)) {
                        Ok(()) => fresh.entry(id.clone()).or_default().push(t),
                        Err((rule, _)) => *out.counters.entry(format!("rescue_dropped_{rule}")).or_default() += 1,
                    },
                    Err(r) => out.rejections.push(r),
                }
            }
            let requests = fresh
                .iter()
                .map(|(id, group)| self.judge_request(id, group).map_err(|e| Error::stage(&cx.name, e)))
                .collect::<Result<Vec<_>>>()?;
            let asked: BTreeMap<String, &Group> = fresh.iter().map(|(id, g)| (id.clone(), g)).collect();
            for (id, verdict) in self.consistency(cx, client, requests, &asked, out).await? {
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
