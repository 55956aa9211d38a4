//! The RL loop: rollouts through the agent, rewards from the graders, dynamic sampling, the
//! mixed DAPO/SFT update, checkpoints and metrics (see the module above for the algorithm).

use std::path::PathBuf;
use std::time::Instant;

use burn::optim::GradientsParams;
use burn::prelude::*;
use kiln_pipeline::rows::row_id;
use kiln_pipeline::stage::StageCx;
use kiln_pipeline::{Error, Result};
use kiln_stages::agent::{AgentSetup, Task, Trajectory};
use kiln_stages::benchmarks::Item;
use kiln_stages::graders::Outcome;

use super::loss::{clipped_tokens, group_advantages, informative, pg_loss, rollout_stats, sft_weight};
use super::metrics::{MetricsLog, RlMetrics, RolloutLog, plot, read_metrics};
use super::policy::{LocalPolicy, RolloutSampling};
use super::{RlConfig, RlPaths};
use crate::backprop::{accumulate, backward};
use crate::learned::{Packed, Sequence, host, pack};
use crate::loader::LoadedModel;
use crate::model::Decoder;
use crate::sft::checkpoint::{load_checkpoint, save_checkpoint};
use crate::sft::data::encode;
use crate::sft::optim::{AdamWSettings, AdamWState, global_norm, restore};
use crate::sft::{add_lora, empty_decoder};
use crate::weights::{SaveDtype, build_decoder, export_weights};

/// What a finished run reports.
#[derive(Debug)]
pub struct RlReport {
    pub steps: u64,
    /// The step training resumed from (0 for a fresh run).
    pub resumed_from: u64,
    pub metrics: Vec<RlMetrics>,
    /// Prompts the run drew from.
    pub prompts: usize,
    /// The trained model directory (HF layout).
    pub model_dir: PathBuf,
}

/// One sampled trajectory and what it earned.
struct Rollout {
    /// `None` when the policy could not write it (its context outgrew `max_len`).
    trajectory: Option<Trajectory>,
    outcome: Outcome,
    reward: f64,
}

/// The prompts in a seeded order, a fresh permutation every epoch; `cursor` is the position.
struct Order {
    seed: u64,
    n: usize,
    cursor: u64,
    epoch: Option<(u64, Vec<usize>)>,
}

impl Order {
    fn next(&mut self) -> usize {
        let epoch = self.cursor / self.n as u64;
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut perm: Vec<usize> = (0..self.n).collect();
            fastrand::Rng::with_seed(self.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15)).shuffle(&mut perm);
            self.epoch = Some((epoch, perm));
        }
        let at = (self.cursor % self.n as u64) as usize;
        self.cursor += 1;
        self.epoch.as_ref().expect("set above").1[at]
    }
}

/// What one step's sampling produced.
#[derive(Default)]
struct Sampled {
    /// Groups kept: (item, rollouts).
    groups: Vec<(usize, Vec<Rollout>)>,
    /// Every prompt drawn (their expert trajectories make the SFT term).
    prompts: Vec<usize>,
    /// (reward, right, tokens written) of every trajectory sampled.
    all: Vec<(f64, bool, u64)>,
    dropped: u64,
    rounds: u64,
    sandbox_s: f64,
    /// One record per trajectory for `rollouts.jsonl`.
    log: Vec<serde_json::Value>,
}

/// Runs (or resumes) RL on `items` (whose agent tasks are `tasks`, in the same order) with
/// the agent `setup` (built for a policy) in stage `cx`. `progress` is called after every step.
pub async fn train_rl(
    config: &RlConfig,
    paths: &RlPaths,
    items: &[Item],
    tasks: &[Task],
    setup: &AgentSetup,
    cx: &StageCx,
    mut progress: impl FnMut(&RlMetrics, u64) + Send,
) -> Result<RlReport> {
    let fail = |e: crate::TrainError| Error::stage(&cx.name, e);
    if items.is_empty() {
        return Err(Error::stage(&cx.name, "the `rl` export has no prompts"));
    }
    let device = crate::default_device();
    if let Some(note) = crate::kernels::first_step_note(&device) {
        tracing::info!(stage = %cx.name, "{note}");
    }
    let train_device = device.clone().autodiff();
    let (mut base, generator) = tokio::task::block_in_place(|| {
        Ok::<_, crate::TrainError>((
            LoadedModel::load(&paths.model, &train_device)?,
            LoadedModel::load(&paths.model, &device)?,
        ))
    })
    .map_err(fail)?;
    let mut decoder =
        std::mem::replace(&mut base.decoder, empty_decoder(&train_device)).with_precision(config.precision);
    if let Some(l) = &config.lora {
        decoder = add_lora(decoder.no_grad(), l, config.seed, &train_device);
    }
    let output_dir = &paths.output_dir;
    std::fs::create_dir_all(output_dir).map_err(|e| Error::io(output_dir, e))?;
    let checkpoint_dir = output_dir.join("checkpoint");
    let run = config.run_key();
    let mut state = AdamWState::default();
    let mut order = Order { seed: config.seed, n: items.len(), cursor: 0, epoch: None };
    let mut resumed_from = 0;
    if let Some((params, opt, extra)) = load_checkpoint(&checkpoint_dir, &run, &train_device).map_err(fail)? {
        decoder = restore(decoder, &params);
        state = opt;
        resumed_from = extra["step"].as_u64().unwrap_or(0);
        order.cursor = extra["cursor"].as_u64().unwrap_or(0);
    }
    let sampling = RolloutSampling {
        temperature: config.temperature,
        top_p: config.top_p,
        max_tokens: config.max_new_tokens,
        max_context: config.max_len,
    };
    let policy = LocalPolicy::start(generator, sampling);
    if resumed_from > 0 {
        policy.update(snapshot(&base, &decoder, &device).map_err(fail)?);
    }
    let agent = setup.start_with_policy(cx, policy.clone()).await?;

    let total = config.max_steps.unwrap_or(((config.epochs * items.len()) / config.prompts_per_step).max(1) as u64);
    let warmup = (config.warmup_ratio * total as f64).round() as u64;
    let peak = config.lr.unwrap_or(if config.lora.is_some() { 1e-5 } else { 1e-6 });
    let settings = AdamWSettings { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: config.weight_decay };
    let metrics_path = output_dir.join("metrics.csv");
    let mut metrics = read_metrics(&metrics_path, resumed_from);
    let mut log = MetricsLog::open(&metrics_path, &metrics).map_err(fail)?;
    let mut rollouts = RolloutLog::open(&output_dir.join("rollouts.jsonl"), resumed_from).map_err(fail)?;

    for step in resumed_from..total {
        let started = Instant::now();
        let sampled = sample(config, &agent, items, tasks, &mut order, step).await?;
        let rollout_s = started.elapsed().as_secs_f64();
        let generation_s = policy.take_seconds();
        let g = sft_weight(step, total, config.g_start, config.g_end);
        let lr = if step < warmup { peak * (step + 1) as f64 / warmup as f64 } else { peak };
        let trained = Instant::now();
        let (pg, sft) = tokio::task::block_in_place(|| {
            Ok::<_, crate::TrainError>((
                policy_sequences(config, &base, &sampled)?,
                expert_sequences(config, &base, items, &sampled.prompts)?,
            ))
        })
        .map_err(fail)?;
        let (trained_decoder, update) = tokio::task::block_in_place(|| {
            train_step(config, &base.config, &train_device, decoder, &pg, &sft, g, lr, &mut state, &settings)
        });
        decoder = trained_decoder;
        policy.update(tokio::task::block_in_place(|| snapshot(&base, &decoder, &device)).map_err(fail)?);
        let rewards: Vec<f64> = sampled.all.iter().map(|a| a.0).collect();
        let n = rewards.len().max(1) as f64;
        let mean = rewards.iter().sum::<f64>() / n;
        let m = RlMetrics {
            step: step + 1,
            reward_mean: mean,
            reward_std: (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt(),
            accuracy: sampled.all.iter().filter(|a| a.1).count() as f64 / n,
            trajectories: rewards.len() as u64,
            prompts: sampled.prompts.len() as u64,
            groups_kept: sampled.groups.len() as u64,
            groups_dropped: sampled.dropped,
            sampling_rounds: sampled.rounds,
            masked: sampled.groups.iter().flat_map(|(_, r)| r).filter(|r| r.outcome.masked()).count() as u64,
            response_tokens: sampled.all.iter().map(|a| a.2 as f64).sum::<f64>() / n,
            entropy: update.entropy,
            clip_fraction: update.clip_fraction,
            g,
            lr,
            pg_loss: update.pg_loss,
            sft_loss: update.sft_loss,
            loss: g * update.sft_loss + (1.0 - g) * update.pg_loss,
            grad_norm: update.grad_norm,
            rollout_s,
            generation_s,
            sandbox_s: sampled.sandbox_s,
            training_s: trained.elapsed().as_secs_f64(),
        };
        log.write(&m).map_err(fail)?;
        rollouts.write(&sampled.log).map_err(fail)?;
        progress(&m, total);
        metrics.push(m);
        if (step + 1) % config.save_every.max(1) == 0 || step + 1 == total {
            let extra = serde_json::json!({"step": step + 1, "cursor": order.cursor});
            save_checkpoint(&checkpoint_dir, &run, &decoder, &state, extra).map_err(fail)?;
        }
    }
    let model_dir = output_dir.join("model");
    base.save_hf(&decoder, &model_dir, SaveDtype::F32).map_err(fail)?;
    plot(&metrics, &output_dir.join("rl.svg")).map_err(fail)?;
    Ok(RlReport { steps: total, resumed_from, metrics, prompts: items.len(), model_dir })
}

/// The trained weights on the generation device, LoRA merged.
fn snapshot(base: &LoadedModel, decoder: &Decoder, device: &Device) -> crate::Result<Decoder> {
    build_decoder(&base.config, export_weights(decoder), &base.path, device)
}

/// The task of `task`'s prompt at `step`: its own trajectory ids and sampling seeds.
fn step_task(task: &Task, step: u64, round: u64) -> Task {
    let mut t = task.clone();
    t.parent = row_id(&[&task.parent], format!("rl step {step} round {round}").as_bytes());
    t
}

/// Samples groups until `prompts_per_step` are informative or the rounds run out.
async fn sample(
    config: &RlConfig,
    agent: &kiln_stages::agent::Agent<'_>,
    items: &[Item],
    tasks: &[Task],
    order: &mut Order,
    step: u64,
) -> Result<Sampled> {
    let group = config.group_size;
    let mut s = Sampled::default();
    while s.groups.len() < config.prompts_per_step && (s.rounds as usize) < config.sampling_rounds {
        let round = s.rounds;
        s.rounds += 1;
        let need = config.prompts_per_step - s.groups.len();
        let picked: Vec<usize> = (0..need).map(|_| order.next()).collect();
        s.prompts.extend(&picked);
        let mut results = Vec::with_capacity(need * group);
        let jobs = picked.iter().map(|&i| Ok(step_task(&tasks[i], step, round)));
        agent
            .sample_each(jobs, group as u32, (need * group) as u64, |r| {
                results.push(r);
                Ok(())
            })
            .await?;
        let mut rollouts: Vec<Rollout> = results
            .into_iter()
            .zip(picked.iter().flat_map(|&i| std::iter::repeat_n(i, group)))
            .map(|(r, item)| match r {
                Ok(t) => {
                    s.sandbox_s += t.steps.iter().map(|st| st.exec_ms).sum::<f64>() / 1e3;
                    let outcome = Outcome::of(&t, &items[item].gold);
                    Rollout { reward: outcome.reward(), outcome, trajectory: Some(t) }
                }
                Err(_) => Rollout { trajectory: None, outcome: Outcome::NoAnswer, reward: Outcome::NoAnswer.reward() },
            })
            .collect();
        if config.shuffle_rewards {
            let mut rewards: Vec<f64> = rollouts.iter().map(|r| r.reward).collect();
            fastrand::Rng::with_seed(config.seed ^ (step << 8) ^ round).shuffle(&mut rewards);
            rollouts.iter_mut().zip(rewards).for_each(|(r, reward)| r.reward = reward);
        }
        let mut rollouts = rollouts.into_iter();
        for &item in &picked {
            let members: Vec<Rollout> = rollouts.by_ref().take(group).collect();
            s.all.extend(members.iter().map(|r| {
                let tokens = r.trajectory.as_ref().map_or(0, |t| t.completion_tokens);
                (r.reward, r.outcome.correct(), tokens)
            }));
            let rewards: Vec<f64> = members.iter().map(|r| r.reward).collect();
            let kept = informative(&rewards);
            s.log.extend(members.iter().enumerate().map(|(sample, r)| {
                serde_json::json!({
                    "step": step + 1, "round": round, "item": items[item].id, "sample": sample,
                    "reward": r.reward, "outcome": format!("{:?}", r.outcome), "group_kept": kept,
                    "answer": r.trajectory.as_ref().and_then(|t| t.final_answer.clone()),
                    "turns": r.trajectory.as_ref().map(|t| t.messages.get(2..).unwrap_or_default().to_vec()),
                })
            }));
            if kept {
                s.groups.push((item, members));
            } else {
                s.dropped += 1;
            }
        }
    }
    Ok(s)
}

/// The policy's own trajectories as sequences with their group advantages; masked ones (a
/// void turn, out of turns) are left out.
fn policy_sequences(config: &RlConfig, base: &LoadedModel, sampled: &Sampled) -> crate::Result<Vec<Sequence>> {
    let mut out = Vec::new();
    for (t, advantage) in policy_gradient_rollouts(&sampled.groups) {
        let turns: Vec<(&str, &str)> = t.messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
        if let Some(seq) = sequence(config, base, &turns, advantage as f32)? {
            out.push(seq);
        }
    }
    Ok(out)
}

/// The trajectories of the kept groups that carry policy gradient, with their advantages: the
/// advantage is centred on the whole group's rewards (masked trajectories included, so their
/// failure still counts in the baseline), but masked trajectories themselves are left out.
fn policy_gradient_rollouts(groups: &[(usize, Vec<Rollout>)]) -> Vec<(&Trajectory, f64)> {
    let mut out = Vec::new();
    for (_, group) in groups {
        let advantages = group_advantages(&group.iter().map(|r| r.reward).collect::<Vec<_>>());
        for (r, advantage) in group.iter().zip(advantages) {
            if let Some(t) = r.trajectory.as_ref().filter(|_| !r.outcome.masked()) {
                out.push((t, advantage));
            }
        }
    }
    out
}

/// The expert trajectories of the step's prompts (each prompt once).
fn expert_sequences(
    config: &RlConfig,
    base: &LoadedModel,
    items: &[Item],
    prompts: &[usize],
) -> crate::Result<Vec<Sequence>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for &i in prompts.iter().filter(|&&i| seen.insert(i)) {
        let turns: Vec<(&str, &str)> = items[i].expert.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
        if turns.is_empty() {
            continue;
        }
        if let Some(seq) = sequence(config, base, &turns, 1.0)? {
            out.push(seq);
        }
    }
    Ok(out)
}

/// A conversation encoded with the chat template, cut at `max_len`; `None` when nothing of
/// the policy's is left to learn.
fn sequence(
    config: &RlConfig,
    base: &LoadedModel,
    turns: &[(&str, &str)],
    advantage: f32,
) -> crate::Result<Option<Sequence>> {
    let mut e = encode(&base.codec, turns).map_err(crate::TrainError::Other)?;
    e.ids.truncate(config.max_len);
    e.learn.truncate(config.max_len);
    let seq = Sequence { weight: advantage, ..e };
    Ok((seq.learned() > 0).then_some(seq))
}

/// What one step's update reports.
#[derive(Default)]
struct Update {
    pg_loss: f64,
    sft_loss: f64,
    grad_norm: f64,
    entropy: f64,
    clip_fraction: f64,
}

/// `parts` roughly equal slices of `items` (some may be empty).
fn split<T>(items: &[T], parts: usize) -> Vec<&[T]> {
    let size = items.len().div_ceil(parts.max(1)).max(1);
    let mut out: Vec<&[T]> = items.chunks(size).collect();
    out.resize(parts.max(1), &[]);
    out
}

/// One step's updates: old log-probabilities of every policy sequence first (the weights that
/// sampled them), then `mini_batches` AdamW updates of `g * SFT + (1 - g) * DAPO`.
#[allow(clippy::too_many_arguments)]
fn train_step(
    config: &RlConfig,
    model: &crate::ModelConfig,
    device: &Device,
    mut decoder: Decoder,
    pg: &[Sequence],
    sft: &[Sequence],
    g: f64,
    lr: f64,
    state: &mut AdamWState,
    settings: &AdamWSettings,
) -> (Decoder, Update) {
    let pg = if g < 1.0 { pg } else { &[] };
    let sft = if g > 0.0 { sft } else { &[] };
    let micro = config.micro_batch.max(1);
    let packs = |seqs: &[Sequence]| -> Vec<Packed> {
        seqs.chunks(micro).map(|c| pack(&c.iter().collect::<Vec<_>>())).collect()
    };
    let pg_parts: Vec<Vec<Packed>> = split(pg, config.mini_batches).into_iter().map(packs).collect();
    let sft_parts: Vec<Vec<Packed>> = split(sft, config.mini_batches).into_iter().map(packs).collect();
    // The rollout policy's log-probabilities and entropy, before any update.
    let (mut entropy_sum, mut pg_tokens_all) = (0.0, 0usize);
    let (frozen, plain) = (decoder.valid(), device.clone().inner());
    let old: Vec<Vec<Vec<f32>>> = pg_parts
        .iter()
        .map(|part| {
            part.iter()
                .map(|p| {
                    let (logp, entropy) = rollout_stats(&frozen, model, p, &plain, config.loss_chunk);
                    entropy_sum += entropy * p.rows.len() as f64;
                    pg_tokens_all += p.rows.len();
                    logp
                })
                .collect()
        })
        .collect();
    drop(frozen);
    let sft_tokens_all: usize = sft_parts.iter().flatten().map(|p| p.rows.len()).sum();
    let mut u = Update { entropy: entropy_sum / pg_tokens_all.max(1) as f64, ..Update::default() };
    let mut clipped = 0;
    let scale_of = |n: usize| 1.0 / n.max(1) as f64;
    for ((pg_part, old_part), sft_part) in pg_parts.iter().zip(&old).zip(&sft_parts) {
        let pg_tokens: usize = pg_part.iter().map(|p| p.rows.len()).sum();
        let sft_tokens: usize = sft_part.iter().map(|p| p.rows.len()).sum();
        if pg_tokens + sft_tokens == 0 {
            continue;
        }
        let mut grads = GradientsParams::new();
        let memory = config.memory();
        for (p, old) in pg_part.iter().zip(old_part) {
            let scale = scale_of(pg_tokens) * (1.0 - g);
            let pg = |logp: Tensor<1>, range: std::ops::Range<usize>| {
                let (old, adv) = (&old[range.clone()], &p.weights[range]);
                let ratios: Vec<f32> =
                    host(logp.clone().detach()).iter().zip(old).map(|(l, o)| (l - o).exp()).collect();
                clipped += clipped_tokens(&ratios, adv, config.clip());
                let n = old.len();
                let old = Tensor::<1>::from_data(TensorData::new(old.to_vec(), [n]), device);
                let adv = Tensor::<1>::from_data(TensorData::new(adv.to_vec(), [n]), device);
                pg_loss(logp, old, adv, config.clip()).sum().mul_scalar(scale)
            };
            let (loss, step_grads) = backward(&decoder, model, p, device, memory, pg);
            // The DAPO term before its weight (g < 1 wherever there are policy tokens).
            u.pg_loss += loss / (1.0 - g) * pg_tokens as f64 / pg_tokens_all.max(1) as f64;
            grads = accumulate(&decoder, grads, step_grads);
        }
        for p in sft_part {
            let nll = |logp: Tensor<1>, _| logp.sum().neg().mul_scalar(scale_of(sft_tokens) * g);
            let (loss, step_grads) = backward(&decoder, model, p, device, memory, nll);
            // The SFT term before its weight (g > 0 wherever there are expert tokens).
            u.sft_loss += loss / g * sft_tokens as f64 / sft_tokens_all.max(1) as f64;
            grads = accumulate(&decoder, grads, step_grads);
        }
        let norm = global_norm(&decoder, &grads);
        u.grad_norm = norm;
        let scale = if norm > config.max_grad_norm { config.max_grad_norm / (norm + 1e-6) } else { 1.0 };
        decoder = crate::sft::optim::step(decoder, &mut grads, state, settings, lr, scale);
    }
    u.clip_fraction = clipped as f64 / pg_tokens_all.max(1) as f64;
    (decoder, u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::random_weights;

    fn tiny() -> (crate::ModelConfig, Decoder, Device) {
        let config: crate::ModelConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": true
        }))
        .unwrap();
        let device = crate::default_device().autodiff();
        let decoder = build_decoder(&config, random_weights(&config, 5), std::path::Path::new("t"), &device).unwrap();
        (config, decoder, device)
    }

    fn config(toml: &str) -> RlConfig {
        toml::from_str(&format!("model = \"m\"\n{toml}")).unwrap()
    }

    fn logp(decoder: &Decoder, config: &crate::ModelConfig, seq: &Sequence, device: &Device) -> f32 {
        host(crate::learned::token_logprobs(decoder, config, &pack(&[seq]), device)).iter().sum()
    }

    fn rollout(outcome: Outcome, id: &str) -> Rollout {
        let t = Trajectory::opening(id.into(), "p".into(), Default::default(), 0, "policy".into(), Vec::new());
        Rollout { reward: outcome.reward(), outcome, trajectory: Some(t) }
    }

    #[test]
    fn masked_trajectories_carry_no_policy_gradient_but_count_in_the_baseline() {
        let right = || Outcome::Right { answer_chars: 1 };
        let groups = vec![(
            0,
            vec![
                rollout(right(), "a"),
                rollout(Outcome::Wrong, "b"),
                rollout(Outcome::BadFormat, "c"),
                rollout(Outcome::NoAnswer, "d"),
            ],
        )];
        let kept = policy_gradient_rollouts(&groups);
        assert_eq!(kept.iter().map(|(t, _)| t.row_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        // Rewards 1, 0, -0.1, 0: mean 0.225, so the wrong answer's advantage is negative.
        let expected = group_advantages(&[1.0, 0.0, -0.1, 0.0]);
        assert_eq!((kept[0].1, kept[1].1), (expected[0], expected[1]));
        assert!(kept[1].1 < 0.0);
    }

    #[test]
    fn an_update_follows_the_sign_of_the_advantage() {
        let (model, decoder, device) = tiny();
        let learn: Vec<bool> = (0..8).map(|i| i >= 4).collect();
        let good = Sequence { ids: vec![1, 2, 3, 4, 5, 6, 7, 8], learn: learn.clone(), weight: 1.0 };
        let bad = Sequence { ids: vec![1, 2, 3, 4, 9, 10, 11, 12], learn, weight: -1.0 };
        let (good0, bad0) = (logp(&decoder, &model, &good, &device), logp(&decoder, &model, &bad, &device));
        let settings = AdamWSettings { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let mut state = AdamWState::default();
        let c = config("g_start = 0.0\ng_end = 0.0");
        let pg = [good.clone(), bad.clone()];
        let (decoder, u) = train_step(&c, &model, &device, decoder, &pg, &[], 0.0, 1e-2, &mut state, &settings);
        assert!(u.pg_loss.abs() < 1e-6, "at ratio 1 the loss is -mean(A) = 0: {}", u.pg_loss);
        assert!(logp(&decoder, &model, &good, &device) > good0, "a positive advantage is reinforced");
        assert!(logp(&decoder, &model, &bad, &device) < bad0, "a negative advantage is discouraged");
    }
}
