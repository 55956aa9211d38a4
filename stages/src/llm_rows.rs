//! What every LLM stage shares: finding its model, and completing one request per row through
//! the row cache, with parse retries and rejections.
//!
//! Every request goes through the row cache keyed by its full body, and is committed as soon as
//! it returns: a rerun, or a rerun after a crash, never pays twice for a finished request. A
//! reply that does not parse is retried with the parse error told to the model (that follow-up
//! is itself a cached request); after `max_parse_retries` the row is rejected with the reason.

use std::collections::BTreeMap;

use futures::stream::{FuturesUnordered, StreamExt};
use kiln_llm::{Client, Completion, Message, ModelConfig};
use kiln_pipeline::cache::CacheKey;
use kiln_pipeline::stage::{CheckCx, Estimate, Problem, Rejection, StageCx};
use kiln_pipeline::{Error, Result, progress};

use crate::reorder::Reorder;

/// A `[models.<name>]` table a stage calls, resolved when the stage is built.
#[derive(Debug, Clone)]
pub struct Model {
    /// The table's name.
    pub name: String,
    /// Its settings, defaults applied.
    pub config: ModelConfig,
}

impl Model {
    /// The model named `name` in `[models]`; the problem is at the stage's `model` key.
    pub fn resolve(cx: &CheckCx, name: &str) -> Result<Model, Problem> {
        let declared: Vec<String> = cx.models.as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        let Some(table) = cx.models.get(name) else {
            let help = kiln_pipeline::error::did_you_mean(name, declared.iter().map(String::as_str))
                .unwrap_or_else(|| format!("declare it as `[models.{name}]` with `base_url` and `model`"));
            return Err(Problem::new("model", format!("unknown model `{name}`")).help(help));
        };
        // The table's own problems are reported at its keys when the file is parsed; here the
        // stage only says that the model it names cannot be used.
        let unusable =
            || Problem::new("model", format!("model `{name}` cannot be used: see the errors of `[models.{name}]`"));
        let config: ModelConfig = serde_json::from_value(table.clone()).map_err(|_| unusable())?;
        if !config.problems().is_empty() {
            return Err(unusable());
        }
        Ok(Model { name: name.to_string(), config })
    }

    /// The run's client for this model: one per model and configuration, shared by every
    /// stage, so the model's concurrency limit and rate budgets hold across stages.
    pub fn client(&self, cx: &StageCx) -> Result<std::sync::Arc<Client>> {
        let key = format!("llm-client\0{}\0{}", self.name, serde_json::to_string(&self.config).unwrap_or_default());
        cx.shared
            .get_or_try_insert(&key, || Client::new(&self.name, self.config.clone()))
            .map_err(|e| Error::stage(&cx.name, e))
    }
}

/// The most samples of one row a stage may ask for.
pub const MAX_SAMPLES: u32 = 1000;

/// Problems with asking `n` samples of each row (at key `key`) from `model`: at least one, at
/// most [`MAX_SAMPLES`], and never several at temperature 0, which would repeat one sample.
pub fn sample_problems(key: &str, n: u32, model: Option<&Model>) -> Vec<Problem> {
    let mut out = Vec::new();
    if !(1..=MAX_SAMPLES).contains(&n) {
        out.push(Problem::new(key, format!("`{key}` must be between 1 and {MAX_SAMPLES}, got {n}")));
    } else if let Some(m) = model
        && n > 1
        && m.config.temperature == Some(0.0)
    {
        out.push(
            Problem::new(key, format!("{n} samples at temperature 0 (model `{}`) are one sample repeated", m.name))
                .help(format!("set `temperature` above 0 in `[models.{}]`, or `{key} = 1`", m.name)),
        );
    }
    out
}

/// Default of every LLM stage's `max_parse_retries`.
pub fn default_parse_retries() -> u32 {
    2
}

/// One lock per request key, so that a request is never sent twice at the same time. A key's
/// entry lives while someone holds or waits for it (the table does not grow with the rows).
#[derive(Debug, Default)]
struct InFlight(std::sync::Mutex<std::collections::HashMap<CacheKey, std::sync::Arc<tokio::sync::Mutex<()>>>>);

/// The turn of one request key: held while the request is sent and cached.
struct Turn<'a> {
    table: &'a InFlight,
    key: CacheKey,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut map = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        // The table's reference and this turn's guard: nobody else waits for the key.
        if map.get(&self.key).is_some_and(|entry| std::sync::Arc::strong_count(entry) <= 2) {
            map.remove(&self.key);
        }
    }
}

impl InFlight {
    async fn lock(&self, key: CacheKey) -> Turn<'_> {
        let entry = self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default().clone();
        Turn { table: self, key, _guard: entry.lock_owned().await }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// One request, for one output row.
#[derive(Debug, Clone)]
pub struct RowRequest {
    /// Id of the row the reply becomes (also used for its rejection).
    pub row_id: String,
    /// The conversation to send.
    pub messages: Vec<Message>,
    /// Which of several samples of the same conversation this is (0 for the first): part of
    /// the cache key, so `n` samples are `n` cached requests, even on servers without `n`.
    pub sample: u32,
}

/// A parsed reply and what it cost.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RowReply<T> {
    /// The parsed value.
    pub value: T,
    /// Prompt tokens over every attempt.
    pub prompt_tokens: u64,
    /// Completion tokens over every attempt.
    pub completion_tokens: u64,
}

/// Replies in request order (`None` for rejected rows), rejections and counters.
pub type Completed<T> = (Vec<Option<RowReply<T>>>, Vec<Rejection>, BTreeMap<String, u64>);

/// One row's outcome, how many of its requests were cache hits, and how many HTTP attempts it
/// took.
type RowOutcome<T> = Result<(Result<RowReply<T>, Rejection>, u64, u32)>;

/// A finished row waiting for its turn: its id, its reply or rejection, cache hits and tries.
type Finished<T> = (String, Result<RowReply<T>, Rejection>, u64, u32);

/// How many rows may start ahead of the oldest unfinished one: a slow or hung request holds
/// only its own slot while up to this many later rows finish (their outcomes wait in a
/// [`Reorder`] buffer, mostly on disk, to be handed on in order); past it, new rows wait for
/// the slow one.
pub const REORDER_WINDOW: usize = 32_768;

/// Completes every request, in parallel within the client's limits; the replies in request
/// order. See [`complete_each`], which this collects.
pub async fn complete_rows<T, P>(
    cx: &StageCx,
    client: &Client,
    requests: Vec<RowRequest>,
    max_parse_retries: u32,
    parse: P,
) -> Result<Completed<T>>
where
    T: Send + serde::Serialize + serde::de::DeserializeOwned,
    P: Fn(&str) -> Result<T, String> + Sync,
{
    let total = requests.len() as u64;
    let mut replies = Vec::with_capacity(requests.len());
    let requests = requests.into_iter().map(|r| Ok((r, ())));
    let (rejections, counters) =
        complete_each(cx, client, requests, total, max_parse_retries, parse, |_, (), reply| {
            replies.push(reply);
            Ok(())
        })
        .await?;
    Ok((replies, rejections, counters))
}

/// Completes `requests` (read as the client frees up, so they may be produced lazily from a
/// large input), each with what it came from (`S`), in parallel within the client's limits,
/// and hands each row's id, source and reply (`None` when rejected) to `on_row` in
/// request order. Requests complete in any order:
/// a slow one holds only its own slot (see [`REORDER_WINDOW`]). Consecutive samples of one
/// conversation are asked in one request with `n` choices when the model `supports_n`.
/// `total` sizes the progress bar. Returns the rejections and counters: cache hits, tokens,
/// cost, the client's attempts, and per row its tries (`row_tries_<k>`, rows that took `k`
/// HTTP attempts this run) and final status (`rows_ok`, `rows_<reason>`).
pub async fn complete_each<S, T, P>(
    cx: &StageCx,
    client: &Client,
    requests: impl Iterator<Item = Result<(RowRequest, S)>>,
    total: u64,
    max_parse_retries: u32,
    parse: P,
    mut on_row: impl FnMut(String, S, Option<RowReply<T>>) -> Result<()>,
) -> Result<(Vec<Rejection>, BTreeMap<String, u64>)>
where
    S: Send,
    T: Send + serde::Serialize + serde::de::DeserializeOwned,
    P: Fn(&str) -> Result<T, String> + Sync,
{
    let before = client.stats().snapshot();
    // Rows going: enough to fill the client's slots with some queued behind them, plus the rows
    // waiting out a backoff (they hold no slot, and must not starve the client of work). Each
    // row going holds its request and reply state (~10 KB), so no more than that: memory stays
    // flat whatever the input's size.
    let max = client.config().max_concurrency;
    let parallel = || (max + max / 2 + client.backing_off()).min(max * 8);
    let bar = progress::bar(&cx.name, total);
    let mut requests = requests.peekable();
    let mut running = FuturesUnordered::new();
    // Rows finished ahead of an earlier one, with their id (not their request: its prompt is
    // no longer needed, and may be long); past a thousand, on disk.
    let mut done: Reorder<S, Finished<T>> = Reorder::new(cx.cache.dir());
    let mut started = 0usize;
    let mut counters: BTreeMap<String, u64> = BTreeMap::new();
    let mut rejections = Vec::new();
    let mut failure = None;
    loop {
        while failure.is_none() && running.len() < parallel() && started - done.next() < REORDER_WINDOW {
            let unit = match next_unit(&mut requests, client.config().supports_n) {
                Some(unit) => unit?,
                None => break,
            };
            let (first, parse) = (started, &parse);
            started += unit.len();
            running.push(async move {
                let together = if unit.len() > 1 {
                    let group: Vec<&RowRequest> = unit.iter().map(|(r, _)| r).collect();
                    ask_group(cx, client, &group).await
                } else {
                    Ok(0)
                };
                let mut outcomes = Vec::with_capacity(unit.len());
                for (k, (request, source)) in unit.into_iter().enumerate() {
                    let outcome = complete_one(cx, client, &request, max_parse_retries, parse).await;
                    outcomes.push((first + k, request, source, outcome));
                }
                (together, outcomes)
            });
        }
        let Some((together, outcomes)) = running.next().await else { break };
        let together = together.unwrap_or_else(|e| {
            failure.get_or_insert(e);
            0
        });
        if together > 0 {
            *counters.entry("samples_asked_together".into()).or_default() += together;
        }
        for (at, request, source, outcome) in outcomes {
            bar.inc(1);
            match outcome {
                Ok((reply, hits, tries)) => done.put(at, source, (request.row_id, reply, hits, tries))?,
                // An error of the stage itself (not of the row: a spent budget, the cache) ends
                // it once the requests in flight are back and cached: they are paid for.
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        if failure.is_some() {
            continue;
        }
        while let Some((source, (row_id, reply, hits, tries))) = done.pop()? {
            *counters.entry("llm_cache_hits".into()).or_default() += hits;
            if tries > 0 {
                *counters.entry(format!("row_tries_{tries}")).or_default() += 1;
            }
            match reply {
                Ok(r) => {
                    *counters.entry("rows_ok".into()).or_default() += 1;
                    *counters.entry("prompt_tokens".into()).or_default() += r.prompt_tokens;
                    *counters.entry("completion_tokens".into()).or_default() += r.completion_tokens;
                    on_row(row_id, source, Some(r))?;
                }
                Err(rejection) => {
                    *counters.entry(format!("rows_{}", rejection.reason)).or_default() += 1;
                    // The endpoint failed past the client's retries: a later run may succeed.
                    if rejection.reason == "llm_failed" {
                        *counters.entry(kiln_pipeline::executor::RETRYABLE.into()).or_default() += 1;
                    }
                    rejections.push(rejection);
                    on_row(row_id, source, None)?;
                }
            }
        }
    }
    bar.finish_and_clear();
    if let Some(e) = failure {
        return Err(e);
    }
    let cost = client.config().cost(
        counters.get("prompt_tokens").copied().unwrap_or(0),
        counters.get("completion_tokens").copied().unwrap_or(0),
    );
    counters.insert("cost_micro_usd".into(), (cost * 1e6).round() as u64);
    // The client is shared by the run's stages: record what it did during this call. (Stages
    // using one model at the same moment may see each other's attempts here.)
    for ((name, after), (_, earlier)) in client.stats().snapshot().into_iter().zip(before) {
        counters.insert(name.to_string(), after - earlier);
    }
    Ok((rejections, counters))
}

/// The next request, with the requests right after it that are further samples of the same
/// conversation when the model takes `n` (they are asked together); `None` at the end.
fn next_unit<S>(
    requests: &mut std::iter::Peekable<impl Iterator<Item = Result<(RowRequest, S)>>>,
    supports_n: bool,
) -> Option<Result<Vec<(RowRequest, S)>>> {
    let first = match requests.next()? {
        Ok(r) => r,
        Err(e) => return Some(Err(e)),
    };
    let mut unit = vec![first];
    while supports_n && matches!(requests.peek(), Some(Ok((next, _))) if next.messages == unit[0].0.messages) {
        if let Some(Ok(next)) = requests.next() {
            unit.push(next);
        }
    }
    Some(Ok(unit))
}

/// One row: request, parse, and on a parse error ask again with the error, up to the limit.
/// Returns the outcome and how many attempts were cache hits.
async fn complete_one<T>(
    cx: &StageCx,
    client: &Client,
    request: &RowRequest,
    max_parse_retries: u32,
    parse: &(impl Fn(&str) -> Result<T, String> + Sync),
) -> RowOutcome<T> {
    let reject =
        |reason: &str, detail: String| Rejection { row_id: request.row_id.clone(), reason: reason.into(), detail };
    let mut messages = request.messages.clone();
    let (mut prompt_tokens, mut completion_tokens, mut hits, mut tries) = (0, 0, 0, 0);
    for attempt in 0..=max_parse_retries {
        let body = client.request_body(&messages, 1);
        let seed = sample_seed(client.config(), cx.seed, request.sample, false);
        let completed = cached_sample(cx, client, &body, seed, request.sample).await;
        let (completion, hit): (Completion, bool) = match completed {
            Ok(c) => c,
            Err(Error::Stage { source, .. }) => {
                // Every attempt failed, or the server refused the request at once.
                tries += match source.downcast_ref::<kiln_llm::LlmError>() {
                    Some(kiln_llm::LlmError::Exhausted { attempts, .. }) => *attempts,
                    _ => 1,
                };
                return Ok((Err(reject("llm_failed", source.to_string())), hits, tries));
            }
            Err(e) => return Err(e),
        };
        hits += hit as u64;
        if !hit {
            tries += completion.attempts.max(1);
        }
        prompt_tokens += completion.prompt_tokens;
        completion_tokens += completion.completion_tokens;
        let text = completion.texts.first().cloned().unwrap_or_default();
        match parse(&text) {
            Ok(value) => return Ok((Ok(RowReply { value, prompt_tokens, completion_tokens }), hits, tries)),
            Err(why) if attempt == max_parse_retries => {
                let head: String = text.chars().take(200).collect();
                return Ok((
                    Err(reject("unparseable", format!("{why} after {} attempts; last reply: {head}", attempt + 1))),
                    hits,
                    tries,
                ));
            }
            Err(why) => {
                messages.push(Message::new("assistant", text));
                messages.push(Message::new(
                    "user",
                    format!("Your reply could not be used: {why}. Answer again, exactly in the required format."),
                ));
            }
        }
    }
    unreachable!("the loop returns on its last attempt")
}

/// The seed of sample `sample` of a request to `config`: the model's seed plus the sample; else,
/// for every sample but the first (or for every one, with `every`), the pipeline's seed plus
/// the sample, so that a deterministic endpoint does not answer every sample alike. `None`
/// leaves the request as the model table makes it.
pub fn sample_seed(config: &ModelConfig, pipeline_seed: u64, sample: u32, every: bool) -> Option<u64> {
    match config.seed {
        Some(seed) => Some(seed.wrapping_add(u64::from(sample))),
        None if sample > 0 || every => Some(pipeline_seed.wrapping_add(u64::from(sample))),
        None => None,
    }
}

/// The cache keys under which sample `sample` of `body` may be stored: with its `seed`, and
/// without it (kiln sent further samples unseeded before they had their own seeds: what was
/// paid for then is found again).
fn sample_keys(body: &serde_json::Value, seed: Option<u64>, sample: u32) -> Result<(CacheKey, Option<CacheKey>)> {
    match seed {
        Some(seed) => {
            let mut seeded = body.clone();
            seeded["seed"] = serde_json::json!(seed);
            Ok((chat_key(&seeded, sample)?, (sample > 0).then(|| chat_key(body, sample)).transpose()?))
        }
        None => Ok((chat_key(body, sample)?, None)),
    }
}

/// [`cached_chat`] for sample `sample` of `body`, sent with `seed` when given, and answered from
/// the row cache when it holds the reply under either of [`sample_keys`].
pub async fn cached_sample(
    cx: &StageCx,
    client: &Client,
    body: &serde_json::Value,
    seed: Option<u64>,
    sample: u32,
) -> Result<(Completion, bool)> {
    let (_, unseeded) = sample_keys(body, seed, sample)?;
    if let Some(key) = unseeded
        && let Some(hit) = cx.cache.get::<Completion>(&key)?
    {
        return Ok((hit, true));
    }
    let mut body = body.clone();
    if let Some(seed) = seed {
        body["seed"] = serde_json::json!(seed);
    }
    cached_chat(cx, client, &body, sample).await
}

/// The samples of one conversation (`group`: one request each) in one request with `n` choices, filed under each sample's own request; nothing when one is
/// already cached or the request fails. Returns how many samples were filed.
async fn ask_group(cx: &StageCx, client: &Client, group: &[&RowRequest]) -> Result<u64> {
    let mut keys = Vec::new();
    for r in group {
        let seed = sample_seed(client.config(), cx.seed, r.sample, false);
        let (key, unseeded) = sample_keys(&client.request_body(&r.messages, 1), seed, r.sample)?;
        for k in [Some(key), unseeded].into_iter().flatten() {
            if cx.cache.get::<Completion>(&k)?.is_some() {
                return Ok(0);
            }
        }
        keys.push(key);
    }
    let n = group.len() as u32;
    let (all, _) = match cached_chat(cx, client, &client.request_body(&group[0].messages, n), 0).await {
        Ok(c) => c,
        // Left to the per-sample path, which retries and rejects with the reason.
        Err(Error::Stage { .. }) => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut filed = 0;
    for (k, key) in keys.iter().enumerate().take(all.texts.len()) {
        let one = Completion {
            texts: vec![all.texts[k].clone()],
            finish_reasons: vec![all.finish_reasons.get(k).cloned().flatten()],
            prompt_tokens: if k == 0 { all.prompt_tokens } else { 0 },
            completion_tokens: all.completion_tokens / u64::from(n)
                + if k == 0 { all.completion_tokens % u64::from(n) } else { 0 },
            attempts: 0,
        };
        cx.cache.put(key, "llm/chat", &one)?;
        filed += 1;
    }
    Ok(filed)
}

/// The cache key of one chat request: its body, and the sample number when it is not the first
/// (so that `n` samples of one conversation are `n` cached requests).
pub fn chat_key(body: &serde_json::Value, sample: u32) -> Result<CacheKey> {
    if sample == 0 { CacheKey::new("llm/chat", body) } else { CacheKey::new("llm/chat", &(body, sample)) }
}

/// Sends `body` unless the row cache has its reply, and stores the reply as soon as it comes:
/// a rerun (even after a crash) never pays twice. Identical requests in flight at once (two
/// stages, two rows) are sent once. Checks and charges the budget. The flag is true on a hit;
/// a request that fails after the client's retries is `Error::Stage`.
pub async fn cached_chat(
    cx: &StageCx,
    client: &Client,
    body: &serde_json::Value,
    sample: u32,
) -> Result<(Completion, bool)> {
    let key = chat_key(body, sample)?;
    let in_flight = cx
        .shared
        .get_or_try_insert("llm-in-flight", || Ok::<_, ()>(InFlight::default()))
        .map_err(|_| Error::Internal("in-flight table".into()))?;
    let _turn = in_flight.lock(key).await;
    cx.cache
        .get_or_compute(&key, "llm/chat", || async {
            cx.budget.check().map_err(|spent| {
                Error::Usage(format!(
                    "{spent}; every finished request is kept in the row cache: raise the cap and rerun to continue"
                ))
            })?;
            let c = client.complete(body).await.map_err(|e| Error::stage(&cx.name, e))?;
            cx.budget.spend(
                c.prompt_tokens + c.completion_tokens,
                client.config().cost(c.prompt_tokens, c.completion_tokens),
            );
            Ok(c)
        })
        .await
}

/// The cost of `requests` (times `repeat`, for stages whose later steps depend on replies),
/// counting requests already in the row cache as free.
pub fn estimate_rows(cx: &StageCx, config: &ModelConfig, requests: &[RowRequest], repeat: u64) -> Result<Estimate> {
    let mut e = Estimate { approximate: repeat > 1, ..Default::default() };
    for request in requests {
        let key = chat_key(&config.request_body(&request.messages, 1), request.sample)?;
        e.requests += repeat;
        if cx.cache.get::<Completion>(&key)?.is_some() {
            e.cached += 1;
            e.requests -= repeat - 1;
            continue;
        }
        let chars: usize = request.messages.iter().map(|m| m.content.len()).sum();
        e.prompt_tokens += repeat * (chars as u64 / 4 + 8);
        e.completion_tokens += repeat * u64::from(config.max_tokens.unwrap_or(512));
    }
    e.cost_usd = config.cost(e.prompt_tokens, e.completion_tokens);
    Ok(e)
}

/// Extracts `<tag>…</tag>` for each tag, trimmed; an error names the first missing or empty one.
pub fn parse_tags(text: &str, tags: &[&str]) -> Result<Vec<String>, String> {
    tags.iter()
        .map(|tag| {
            let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
            let start = text.find(&open).ok_or_else(|| format!("missing <{tag}>"))? + open.len();
            let end = text[start..].find(&close).ok_or_else(|| format!("missing </{tag}>"))? + start;
            let value = text[start..end].trim();
            if value.is_empty() { Err(format!("<{tag}> is empty")) } else { Ok(value.to_string()) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(seed: Option<u64>) -> ModelConfig {
        let mut c: ModelConfig =
            serde_json::from_value(serde_json::json!({"base_url": "http://127.0.0.1:9/v1", "model": "m"})).unwrap();
        c.seed = seed;
        c
    }

    #[test]
    fn further_samples_get_their_own_seeds() {
        assert_eq!(sample_seed(&config(None), 7, 0, false), None, "the first request as it always was");
        assert_eq!(sample_seed(&config(None), 7, 2, false), Some(9));
        assert_eq!(sample_seed(&config(None), 7, 0, true), Some(7));
        assert_eq!(sample_seed(&config(Some(100)), 7, 0, false), Some(100));
        assert_eq!(sample_seed(&config(Some(100)), 7, 3, false), Some(103));
    }

    #[tokio::test]
    async fn the_in_flight_table_holds_only_keys_in_use() {
        let table = InFlight::default();
        let (a, b) = (CacheKey::new("t", &"a").unwrap(), CacheKey::new("t", &"b").unwrap());
        let first = table.lock(a).await;
        let other = table.lock(b).await;
        assert_eq!(table.len(), 2);
        drop(other);
        assert_eq!(table.len(), 1, "a finished key leaves the table");
        // A second request for `a` waits for the first, and the key stays until both are done.
        let waiter = async {
            let _second = table.lock(a).await;
        };
        let release = async {
            tokio::task::yield_now().await;
            assert_eq!(table.len(), 1);
            drop(first);
        };
        tokio::join!(waiter, release);
        assert_eq!(table.len(), 0, "nothing left once every request is done");
    }

    #[test]
    fn consecutive_samples_of_one_conversation_are_one_unit_when_the_model_takes_n() {
        let request = |text: &str, sample: u32| {
            Ok((
                RowRequest { row_id: format!("{text}{sample}"), messages: vec![Message::new("user", text)], sample },
                sample,
            ))
        };
        let requests = || vec![request("a", 0), request("a", 1), request("b", 0), request("a", 2)].into_iter();
        let units = |supports_n: bool| {
            let mut it = requests().peekable();
            std::iter::from_fn(|| next_unit(&mut it, supports_n))
                .map(|u| u.unwrap().into_iter().map(|(r, _)| r.row_id).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        assert_eq!(units(true), [vec!["a0", "a1"], vec!["b0"], vec!["a2"]]);
        assert_eq!(units(false), [vec!["a0"], vec!["a1"], vec!["b0"], vec!["a2"]]);
    }

    /// A reply paid for when further samples were sent without a seed is found again.
    #[tokio::test]
    async fn replies_cached_before_samples_had_seeds_are_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let cx = StageCx {
            name: "s".into(),
            pipeline: CheckCx::default(),
            seed: 0,
            cache: std::sync::Arc::new(kiln_pipeline::cache::RowCache::open(tmp.path()).unwrap()),
            budget: Default::default(),
            shared: Default::default(),
            written: Default::default(),
            sink: Default::default(),
        };
        // Port 9 (discard) on loopback: a request sent there fails, so a hit must come from the cache.
        let client = Client::new("m", ModelConfig { max_retries: 0, timeout_s: 1.0, ..config(None) }).unwrap();
        let body = client.request_body(&[Message::new("user", "q")], 1);
        let paid = Completion {
            texts: vec!["old".into()],
            finish_reasons: vec![None],
            prompt_tokens: 3,
            completion_tokens: 1,
            attempts: 0,
        };
        cx.cache.put(&chat_key(&body, 1).unwrap(), "llm/chat", &paid).unwrap();
        let (got, hit) = cached_sample(&cx, &client, &body, Some(1), 1).await.unwrap();
        assert!(hit && got.texts == ["old"]);
        let (seeded, _) = sample_keys(&body, Some(1), 1).unwrap();
        assert_ne!(seeded, chat_key(&body, 1).unwrap(), "new requests carry the seed");
        assert!(cached_sample(&cx, &client, &body, Some(2), 2).await.is_err(), "anything else is sent");
    }

    #[test]
    fn tags_are_extracted_or_named_as_missing() {
        let t = "x <question> Why? </question><type>number</type>";
        assert_eq!(parse_tags(t, &["question", "type"]).unwrap(), ["Why?", "number"]);
        assert_eq!(parse_tags(t, &["description"]).unwrap_err(), "missing <description>");
        assert_eq!(parse_tags("<type> </type>", &["type"]).unwrap_err(), "<type> is empty");
    }
}
