//! Running a [`Plan`]: stages in topological order, independent ones concurrently, each skipped
//! when its fingerprint matches its finished dataset; and `status`, which says why a stage would
//! run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinSet;

use crate::budget::Budget;
use crate::cache::RowCache;
use crate::error::{Error, Result};
use crate::fingerprint::{FingerprintParts, file_states};
use crate::plan::Plan;
use crate::stage::{Estimate, Input, Shared, Sink, StageCx};
use crate::store::{LEDGER, MANIFEST, Manifest, Store, now};

/// Which stages `kiln run` may run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run only this stage (always), reading its inputs' existing datasets.
    pub only: Option<String>,
    /// Rerun this stage and everything downstream of it, fresh or not.
    pub from: Option<String>,
    /// Rerun every stage.
    pub force: bool,
    /// Hash every file of every dataset before trusting it (otherwise only files whose size or
    /// modification time changed are hashed).
    pub verify: bool,
}

/// What happened to one stage.
#[derive(Debug)]
pub enum Outcome {
    /// It ran and wrote its dataset.
    Ran {
        /// The new manifest.
        manifest: Box<Manifest>,
        /// Why it ran.
        reasons: Vec<String>,
        /// Seconds it took.
        seconds: f64,
    },
    /// Its dataset was up to date.
    Fresh,
    /// Not selected by `--only`.
    NotSelected,
    /// An upstream stage failed.
    Blocked,
    /// It failed.
    Failed(Error),
}

/// The outcome of each stage, in topological order.
#[derive(Debug, Default)]
pub struct RunReport {
    /// `(stage, outcome)` pairs.
    pub stages: Vec<(String, Outcome)>,
}

impl RunReport {
    /// The first failure, if any.
    pub fn failure(&self) -> Option<&Error> {
        self.stages.iter().find_map(|(_, o)| match o {
            Outcome::Failed(e) => Some(e),
            _ => None,
        })
    }

    /// Names of the stages that ran.
    pub fn ran(&self) -> Vec<&str> {
        self.stages.iter().filter(|(_, o)| matches!(o, Outcome::Ran { .. })).map(|(n, _)| n.as_str()).collect()
    }
}

/// Whether a stage is up to date, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freshness {
    /// Its dataset matches its current fingerprint.
    Fresh,
    /// It would run, for these reasons.
    Stale(Vec<String>),
}

/// The fingerprint parts of stage `i`, given its inputs' content hashes.
fn parts_of(plan: &Plan, i: usize, input_hashes: &BTreeMap<String, String>) -> FingerprintParts {
    let s = &plan.stages[i];
    let stage = plan.stage(i);
    let files = file_states(&stage.files(&plan.check_cx), &plan.check_cx.base_dir);
    FingerprintParts {
        kind: s.kind.clone(),
        version: stage.version(),
        params: s.params.clone(),
        files,
        inputs: input_hashes.clone(),
        seed: stage.seeded().then_some(plan.settings.seed),
        models: stage
            .models()
            .into_iter()
            .filter_map(|m| plan.check_cx.models.get(&m).map(|table| (m, table.clone())))
            .collect(),
    }
}

/// The counter a stage sets to the number of rows it rejected for a reason that may pass on
/// another attempt (an LLM endpoint that failed past its retries): such a stage is stale until
/// it has none, so a plain rerun finishes the job.
pub const RETRYABLE: &str = "retryable";

/// Why a stage whose dataset has `manifest` (with `damage`, if its files are not as written)
/// would run now with `parts` (or that it would not).
fn freshness(manifest: Option<&Manifest>, damage: Option<String>, parts: &FingerprintParts) -> Freshness {
    let Some(manifest) = manifest else {
        return Freshness::Stale(vec!["no output yet".into()]);
    };
    if let Some(damage) = damage {
        return Freshness::Stale(vec![format!(
            "its output is damaged ({damage}): rebuilt, with every row already paid for taken from the row cache"
        )]);
    }
    if manifest.fingerprint == parts.fingerprint() {
        return match manifest.counters.get(RETRYABLE).copied().unwrap_or(0) {
            0 => Freshness::Fresh,
            n => Freshness::Stale(vec![format!(
                "{n} rows failed on errors that may pass (an unreachable or failing endpoint); running again retries them"
            )]),
        };
    }
    let mut why = parts.changes_from(&manifest.parts);
    if why.is_empty() {
        why.push("fingerprint changed".into());
    }
    Freshness::Stale(why)
}

/// Where an input of a stage stands when the stage is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Upstream {
    /// Its dataset is final, with this content hash.
    Ready(String),
    /// It is stale and runs first.
    RunsFirst,
}

/// Whether stage `i`, whose dataset has `manifest`, must run given where its inputs stand, and
/// the fingerprint parts it would run under (once every input is ready). The one decision
/// behind `status`, `--dry-run` and `run`.
fn decide(
    plan: &Plan,
    i: usize,
    (manifest, damage): (Option<&Manifest>, Option<String>),
    inputs: &[(String, Upstream)],
) -> (Freshness, Option<FingerprintParts>) {
    let mut hashes = BTreeMap::new();
    let mut waiting = Vec::new();
    for (name, upstream) in inputs {
        match upstream {
            Upstream::Ready(hash) => {
                hashes.insert(name.clone(), hash.clone());
            }
            Upstream::RunsFirst => waiting.push(format!("input `{name}` is stale and runs first")),
        }
    }
    if !waiting.is_empty() {
        return (Freshness::Stale(waiting), None);
    }
    let parts = parts_of(plan, i, &hashes);
    (freshness(manifest, damage, &parts), Some(parts))
}

/// One line per stage, in topological order: fresh, or stale with the reasons; `verify` hashes
/// every file of every dataset.
pub fn status(plan: &Plan, verify: bool) -> Result<Vec<(String, Freshness)>> {
    let store = Store::new(&plan.output_dir);
    let mut ready: BTreeMap<usize, String> = BTreeMap::new();
    let mut out = Vec::new();
    for &i in &plan.order {
        let name = plan.stages[i].name.clone();
        let manifest = store.manifest(&name)?;
        let inputs: Vec<(String, Upstream)> = plan
            .graph
            .inputs(i)
            .iter()
            .map(|&u| {
                let upstream = ready.get(&u).map_or(Upstream::RunsFirst, |h| Upstream::Ready(h.clone()));
                (plan.stages[u].name.clone(), upstream)
            })
            .collect();
        let damage = manifest.as_ref().and_then(|m| store.damage(m, verify));
        let (state, _) = decide(plan, i, (manifest.as_ref(), damage), &inputs);
        if let (Freshness::Fresh, Some(m)) = (&state, manifest) {
            ready.insert(i, m.content_hash);
        }
        out.push((name, state));
    }
    Ok(out)
}

/// What `kiln run --dry-run` says about one stage.
#[derive(Debug)]
pub struct DryRun {
    /// Stage name.
    pub stage: String,
    /// Whether it would run, and why.
    pub freshness: Freshness,
    /// Its LLM cost, when it calls a model and its inputs exist.
    pub estimate: Option<Estimate>,
    /// Why the estimate is missing or rough.
    pub note: Option<String>,
}

/// What `kiln run` would run and what its LLM stages would cost, sending nothing. Stages whose
/// inputs do not exist yet cannot be estimated; stages whose inputs will change first are
/// estimated from the current inputs.
pub async fn dry_run(plan: &Plan) -> Result<Vec<DryRun>> {
    let store = Store::new(&plan.output_dir);
    let cache = Arc::new(RowCache::open(&plan.output_dir)?);
    let mut out = Vec::new();
    for (name, freshness) in status(plan, false)? {
        let i = plan.stage_index(&name)?;
        let mut line = DryRun { stage: name.clone(), freshness, estimate: None, note: None };
        if matches!(line.freshness, Freshness::Stale(_)) {
            let ups: Vec<usize> = plan.graph.inputs(i).to_vec();
            let missing: Vec<&str> = ups
                .iter()
                .map(|&u| plan.stages[u].name.as_str())
                .filter(|n| store.manifest(n).ok().flatten().is_none())
                .collect();
            if missing.is_empty() {
                let inputs: Vec<Input> = ups
                    .iter()
                    .map(|&u| Input {
                        name: plan.stages[u].name.clone(),
                        dir: store.stage_dir(&plan.stages[u].name),
                        schema: plan.stages[u].schema.clone(),
                    })
                    .collect();
                let cx = StageCx {
                    name: name.clone(),
                    pipeline: plan.check_cx.clone(),
                    seed: plan.settings.seed,
                    cache: cache.clone(),
                    budget: Arc::new(Budget::default()),
                    shared: Arc::new(Shared::default()),
                    written: Default::default(),
                    sink: Default::default(),
                };
                line.estimate = plan.stage(i).estimate(&cx, &inputs).await?;
                let changing = ups.iter().any(|&u| {
                    out.iter().any(|d: &DryRun| d.stage == plan.stages[u].name && d.freshness != Freshness::Fresh)
                });
                if changing && line.estimate.is_some() {
                    line.note = Some("estimated from the current inputs, which run first".into());
                }
            } else {
                line.note = Some(format!("cost known once {} has run", missing.join(", ")));
            }
        }
        out.push(line);
    }
    Ok(out)
}

/// Runs the plan. Independent stages run in parallel tasks. Stages fail independently: a
/// failure blocks only what is downstream of it.
pub async fn run(plan: Arc<Plan>, opts: &RunOptions) -> Result<RunReport> {
    let store = Store::new(&plan.output_dir);
    store.clean_leftovers()?;
    let cache = Arc::new(RowCache::open(&plan.output_dir)?);
    let budget = Arc::new(Budget::new(plan.settings.max_tokens, plan.settings.max_cost_usd));
    let shared = Arc::new(Shared::default());
    let only = opts.only.as_deref().map(|n| plan.stage_index(n)).transpose()?;
    let forced = match (&opts.from, opts.force) {
        (_, true) => (0..plan.graph.len()).collect(),
        (Some(from), false) => plan.graph.downstream(plan.stage_index(from)?),
        (None, false) => Default::default(),
    };

    let n = plan.graph.len();
    let mut outcomes: Vec<Option<Outcome>> = (0..n).map(|_| None).collect();
    let mut hashes: Vec<Option<String>> = vec![None; n];
    let mut started = vec![false; n];
    let mut running = JoinSet::new();
    loop {
        for &i in &plan.order {
            if started[i] || !plan.graph.inputs(i).iter().all(|&u| outcomes[u].is_some()) {
                continue;
            }
            started[i] = true;
            let name = &plan.stages[i].name;
            if let Some(&u) = plan.graph.inputs(i).iter().find(|&&u| hashes[u].is_none()) {
                outcomes[i] = Some(match outcomes[u] {
                    Some(Outcome::NotSelected) => Outcome::Failed(Error::Usage(format!(
                        "stage `{name}` needs the output of `{}`, which does not exist yet: run it first",
                        plan.stages[u].name
                    ))),
                    _ => Outcome::Blocked,
                });
                continue;
            }
            if only.is_some_and(|o| o != i) {
                let manifest = store.manifest(name)?;
                hashes[i] = manifest.map(|m| m.content_hash);
                outcomes[i] = Some(Outcome::NotSelected);
                continue;
            }
            // Every input has finished here: its dataset is final.
            let inputs: Vec<(String, Upstream)> = plan
                .graph
                .inputs(i)
                .iter()
                .map(|&u| (plan.stages[u].name.clone(), Upstream::Ready(hashes[u].clone().unwrap_or_default())))
                .collect();
            let manifest = store.manifest(name)?;
            let damage = manifest.as_ref().and_then(|m| store.damage(m, opts.verify));
            let (state, parts) = decide(&plan, i, (manifest.as_ref(), damage), &inputs);
            let parts =
                parts.ok_or_else(|| Error::Internal("a stage whose inputs are ready has no fingerprint".into()))?;
            let reasons = match state {
                Freshness::Fresh if !forced.contains(&i) && only.is_none() => {
                    hashes[i] = manifest.map(|m| m.content_hash);
                    outcomes[i] = Some(Outcome::Fresh);
                    continue;
                }
                Freshness::Fresh => vec!["forced".to_string()],
                Freshness::Stale(why) => why,
            };
            let (plan, store, cache, budget, shared) =
                (plan.clone(), store.clone(), cache.clone(), budget.clone(), shared.clone());
            running
                .spawn(async move { (i, run_stage(&plan, i, &store, (cache, budget, shared), parts, reasons).await) });
        }
        // Everything startable has started; wait for one stage to finish, or stop when idle.
        let Some(joined) = running.join_next().await else { break };
        let (i, result) = joined.map_err(|e| Error::Internal(format!("a stage task panicked: {e}")))?;
        match result {
            Ok(outcome) => {
                if let Outcome::Ran { manifest, .. } = &outcome {
                    hashes[i] = Some(manifest.content_hash.clone());
                }
                outcomes[i] = Some(outcome);
            }
            Err(e) => {
                tracing::error!(stage = %plan.stages[i].name, error = %e, "Stage failed.");
                outcomes[i] = Some(Outcome::Failed(e));
            }
        }
    }
    // The ledger only changes when a stage ran (or it was never written).
    let ran = outcomes.iter().any(|o| matches!(o, Some(Outcome::Ran { .. })));
    if ran || !store.stage_dir(LEDGER).join(MANIFEST).exists() {
        store.write_ledger(&plan.stage_names())?;
    }
    let stages = plan
        .order
        .iter()
        .map(|&i| (plan.stages[i].name.clone(), outcomes[i].take().unwrap_or(Outcome::Blocked)))
        .collect();
    Ok(RunReport { stages })
}

async fn run_stage(
    plan: &Plan,
    i: usize,
    store: &Store,
    (cache, budget, shared): (Arc<RowCache>, Arc<Budget>, Arc<Shared>),
    parts: FingerprintParts,
    reasons: Vec<String>,
) -> Result<Outcome> {
    let planned = &plan.stages[i];
    let name = planned.name.clone();
    tracing::info!(stage = %name, kind = %planned.kind, why = %reasons.join("; "), "Running stage.");
    let clock = Instant::now();
    let started_at = now();
    let mut inputs = Vec::new();
    let mut input_fingerprints = BTreeMap::new();
    for &u in plan.graph.inputs(i) {
        let up = &plan.stages[u].name;
        let Some(upstream) = store.manifest(up)? else {
            return Err(Error::Usage(format!(
                "stage `{name}` needs the output of `{up}`, which does not exist yet: run `{up}` first"
            )));
        };
        input_fingerprints.insert(up.clone(), upstream.fingerprint);
        inputs.push(Input { name: up.clone(), dir: store.stage_dir(up), schema: plan.stages[u].schema.clone() });
    }
    let cx = StageCx {
        name: name.clone(),
        pipeline: plan.check_cx.clone(),
        seed: plan.settings.seed,
        cache,
        budget: Arc::new(Budget::stage(budget, planned.limits.max_tokens, planned.limits.max_cost_usd)),
        shared,
        written: Default::default(),
        sink: Arc::new(Sink::parts(store.parts(&name, &planned.schema)?)),
    };
    let output = plan.stage(i).run(&cx, &inputs).await.map_err(|e| match e {
        e @ Error::Stage { .. } => e,
        e => Error::stage(&name, e),
    })?;
    let manifest = Manifest {
        stage: name.clone(),
        fingerprint: parts.fingerprint(),
        parts,
        input_fingerprints,
        content_hash: String::new(),
        schema: Vec::new(),
        row_count: 0,
        rejected: 0,
        files: Vec::new(),
        started_at,
        finished_at: String::new(),
        counters: output.counters.clone(),
        checks: Vec::new(),
    };
    let written = cx.written.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let sink = Arc::try_unwrap(cx.sink)
        .map_err(|_| Error::Internal(format!("stage `{name}` kept its output sink after it finished")))?;
    let mut parts = sink.into_parts().ok_or_else(|| Error::Internal("the output sink lost its writer".into()))?;
    for batch in output.batches {
        parts.push(batch)?;
    }
    let manifest = store.finish(parts, &output.rejections, &written, manifest)?;
    let seconds = clock.elapsed().as_secs_f64();
    tracing::info!(stage = %name, rows = manifest.row_count, rejected = manifest.rejected, seconds, "Stage finished.");
    Ok(Outcome::Ran { manifest: Box::new(manifest), reasons, seconds })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::fingerprint::parts_with as parts;

    fn manifest(parts: &FingerprintParts, counters: &[(&str, u64)]) -> Manifest {
        Manifest {
            stage: "s".into(),
            fingerprint: parts.fingerprint(),
            parts: parts.clone(),
            input_fingerprints: BTreeMap::new(),
            content_hash: "h".into(),
            schema: vec![],
            row_count: 0,
            rejected: 0,
            files: vec![],
            started_at: String::new(),
            finished_at: String::new(),
            counters: counters.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            checks: Vec::new(),
        }
    }

    #[test]
    fn a_stage_without_output_is_stale() {
        let p = parts(serde_json::json!({"size": 3}));
        assert_eq!(freshness(None, None, &p), Freshness::Stale(vec!["no output yet".into()]));
    }

    #[test]
    fn a_matching_fingerprint_is_fresh_unless_rows_may_pass_on_a_retry() {
        let p = parts(serde_json::json!({"size": 3}));
        assert_eq!(freshness(Some(&manifest(&p, &[])), None, &p), Freshness::Fresh);
        assert_eq!(freshness(Some(&manifest(&p, &[(RETRYABLE, 0)])), None, &p), Freshness::Fresh);
        let Freshness::Stale(why) = freshness(Some(&manifest(&p, &[(RETRYABLE, 3)])), None, &p) else {
            panic!("rows that failed on a flaky endpoint keep the stage stale")
        };
        assert!(why[0].starts_with("3 rows failed"), "{why:?}");
    }

    #[test]
    fn what_changed_is_said_in_words() {
        let old = parts(serde_json::json!({"size": 3, "label": "a"}));
        let mut new = parts(serde_json::json!({"size": 4, "label": "a", "extra": true}));
        new.inputs.insert("up".into(), "h2".into());
        new.version = 2;
        let Freshness::Stale(why) = freshness(Some(&manifest(&old, &[])), None, &new) else { panic!("stale") };
        assert_eq!(
            why,
            [
                "implementation version changed from 1 to 2",
                "parameter `extra` added",
                "parameter `size` changed",
                "input `up` added",
            ]
        );
    }
}
