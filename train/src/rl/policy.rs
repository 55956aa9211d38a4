//! The policy in training as the agent's turn writer ([`kiln_stages::agent::Policy`]): one
//! thread holds a copy of the current weights and answers every turn the rollouts ask for
//! together, in one batch through the key/value cache, while other rollouts' code cells run in
//! the sandbox. The trainer hands it new weights between rollout phases.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_llm::Message;
use kiln_stages::agent::protocol::STOP;
use kiln_stages::agent::{Policy, PolicyTurn};

use crate::generate::{Request, Sampling, generate_batch};
use crate::loader::LoadedModel;
use crate::model::Decoder;

/// How rollouts sample.
#[derive(Clone, Debug)]
pub struct RolloutSampling {
    pub temperature: f32,
    pub top_p: f32,
    /// Tokens per turn at most.
    pub max_tokens: usize,
    /// Longest context (prompt and turns so far) the policy is asked to continue.
    pub max_context: usize,
}

/// How long the generation thread waits for more turns to join a batch.
const GATHER: Duration = Duration::from_millis(3);

enum Job {
    Turn { messages: Vec<Message>, seed: u64, reply: tokio::sync::oneshot::Sender<Result<PolicyTurn, String>> },
    Weights(Box<Decoder>),
}

/// A handle on the generation thread.
pub struct LocalPolicy {
    jobs: Mutex<Sender<Job>>,
    /// Seconds the thread spent generating since the last [`LocalPolicy::take_seconds`].
    busy: Arc<Mutex<f64>>,
}

impl LocalPolicy {
    /// Starts the generation thread on `model` (on a device without autodiff).
    pub fn start(model: LoadedModel, sampling: RolloutSampling) -> Arc<Self> {
        let (tx, rx) = channel();
        let busy = Arc::new(Mutex::new(0.0));
        let counted = busy.clone();
        std::thread::Builder::new()
            .name("kiln-rl-policy".into())
            .spawn(move || serve(model, sampling, rx, counted))
            .expect("spawn the policy thread");
        Arc::new(LocalPolicy { jobs: Mutex::new(tx), busy })
    }

    /// Replaces the weights the next turns are sampled from.
    pub fn update(&self, decoder: Decoder) {
        let _ = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).send(Job::Weights(Box::new(decoder)));
    }

    /// Seconds spent generating since the last call.
    pub fn take_seconds(&self) -> f64 {
        std::mem::take(&mut *self.busy.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[async_trait::async_trait]
impl Policy for LocalPolicy {
    fn name(&self) -> String {
        "policy".into()
    }

    async fn turn(&self, messages: &[Message], seed: u64) -> Result<PolicyTurn, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job::Turn { messages: messages.to_vec(), seed, reply };
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).send(job).map_err(|_| "the policy thread stopped")?;
        answer.await.map_err(|_| "the policy thread stopped".to_string())?
    }
}

/// The thread: gathers the turns asked for within [`GATHER`] of each other and generates them
/// as one batch; applies new weights in the order they come.
fn serve(mut model: LoadedModel, sampling: RolloutSampling, jobs: Receiver<Job>, busy: Arc<Mutex<f64>>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        loop {
            match jobs.recv_timeout(GATHER) {
                Ok(job) => batch.push(job),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let mut turns = Vec::new();
        for job in batch {
            match job {
                Job::Weights(decoder) => {
                    answer(&model, &sampling, std::mem::take(&mut turns), &busy);
                    model.decoder = *decoder;
                }
                Job::Turn { messages, seed, reply } => turns.push((messages, seed, reply)),
            }
        }
        answer(&model, &sampling, turns, &busy);
    }
}

type Pending = (Vec<Message>, u64, tokio::sync::oneshot::Sender<Result<PolicyTurn, String>>);

fn answer(model: &LoadedModel, sampling: &RolloutSampling, turns: Vec<Pending>, busy: &Mutex<f64>) {
    if turns.is_empty() {
        return;
    }
    let start = Instant::now();
    let mut requests = Vec::new();
    let mut replies = Vec::new();
    for (messages, seed, reply) in turns {
        match prompt(model, &messages, sampling.max_context) {
            Ok(prompt) => {
                let sampling = Sampling {
                    max_tokens: sampling.max_tokens,
                    temperature: sampling.temperature,
                    top_p: sampling.top_p,
                    top_k: 0,
                    seed,
                    stop: STOP.iter().map(|s| s.to_string()).collect(),
                    ignore_eos: false,
                };
                requests.push(Request { prompt, sampling });
                replies.push(reply);
            }
            Err(why) => {
                let _ = reply.send(Err(why));
            }
        }
    }
    let result = generate_batch(model, &requests);
    *busy.lock().unwrap_or_else(|e| e.into_inner()) += start.elapsed().as_secs_f64();
    match result {
        Ok(generated) => {
            for ((reply, completion), request) in replies.into_iter().zip(generated.completions).zip(&requests) {
                let _ = reply.send(Ok(PolicyTurn {
                    text: with_stop(model, &completion),
                    prompt_tokens: request.prompt.len() as u64,
                    completion_tokens: completion.tokens.len() as u64,
                }));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(format!("generation failed: {e}")));
            }
        }
    }
}

/// The conversation rendered with the model's chat template, ready for the assistant's turn.
fn prompt(model: &LoadedModel, messages: &[Message], max_context: usize) -> Result<Vec<u32>, String> {
    let turns: Vec<(&str, &str)> = messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
    let text = model.codec.chat.render_turns(&turns, true).map_err(|e| format!("chat template: {e:#}"))?;
    let ids = model.codec.encode(&text).map_err(|e| e.to_string())?;
    if ids.len() >= max_context {
        return Err(format!("the conversation is {} tokens, max_len is {max_context}", ids.len()));
    }
    Ok(ids)
}

/// The turn as the policy wrote it, through the stop string that ended it: the agent restores
/// a stop string a server dropped with its own spacing, and the trainer must see the policy's
/// exact text.
fn with_stop(model: &LoadedModel, completion: &crate::generate::Completion) -> String {
    let full = model.codec.decode(&completion.tokens, true).unwrap_or_else(|_| completion.text.clone());
    let end = STOP.iter().filter_map(|s| full.find(s).map(|at| at + s.len())).min();
    match end {
        Some(end) => full[..end].to_string(),
        None => completion.text.clone(),
    }
}
