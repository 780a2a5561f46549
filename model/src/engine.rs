//! The sampling engine: batched, KV-cached generation and teacher-forced scoring.
//!
//! One call prefills every prompt of the batch once (left-padded to a common
//! length), repeats each prompt's cache rows for its `n` samples, then decodes
//! all rows in lockstep, dropping finished rows from the batch as it goes.
//! Sampling (temperature, top-k, top-p) runs on the model's device; the uniform
//! draw of each row comes from its own ChaCha stream seeded from the request's
//! seed, so a seed reproduces samples on any device and in any batch.

use crate::{Error, KvCache, Result, Tokenizer, Transformer};
use prism_core::FinishReason;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

/// How to sample completions of a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Samples per prompt; they share one prefill.
    pub n: usize,
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches
    /// `top_p` (nucleus); `1` keeps all.
    pub top_p: f32,
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// Stop when the completion text contains one of these.
    pub stop: Vec<String>,
    /// Stop after sampling one of these token ids (the token is kept).
    pub eos: Vec<u32>,
    /// Seed of the sampling streams.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { n: 1, temperature: 1.0, top_k: 0, top_p: 1.0, max_new_tokens: 64, stop: Vec::new(), eos: Vec::new(), seed: 0 }
    }
}

impl SamplingParams {
    /// Greedy decoding of up to `max_new_tokens`, stopping on `eos`.
    pub fn greedy(max_new_tokens: usize, eos: Vec<u32>) -> Self {
        Self { temperature: 0.0, max_new_tokens, eos, ..Self::default() }
    }

    fn validate(&self) -> Result<()> {
        if self.n == 0 {
            return Err(Error::invalid("n", "must be at least 1"));
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::invalid("temperature", format!("{} (must be >= 0)", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid("top_p", format!("{} (must be in (0, 1])", self.top_p)));
        }
        Ok(())
    }

    fn greedy_mode(&self) -> bool {
        self.temperature == 0.0
    }
}

/// The model's own (temperature 1) log-probability of a generated token and of
/// the most likely alternatives, as OpenAI-style `logprobs` report them.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// `(token id, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// One completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Generated token ids (an eos token that ended the sample included).
    pub tokens: Vec<u32>,
    /// Log-probability of each token under the distribution it was sampled
    /// from (temperature-scaled, top-k/top-p truncated, renormalised); greedy
    /// tokens carry their temperature-1 log-probability.
    pub logprobs: Vec<f32>,
    /// The decoded completion, special tokens left out (a stop string that
    /// ended it included).
    pub text: String,
    /// Byte offset in `text` where each token's text ends.
    pub token_ends: Vec<u32>,
    pub finish: FinishReason,
    /// Per token, when the request asked for `top_logprobs`.
    pub top_logprobs: Vec<TokenLogprobs>,
    /// Where a [`Refresh`] loaded newer weights while the sample was being
    /// generated: `(i, v)`, tokens from index `i` on were sampled by version
    /// `v` (before the first, by the weights the call began with).
    pub versions: Vec<(u32, u64)>,
}

/// One prompt with its own sampling settings (the server batches requests
/// with different settings together).
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Record the model's log-probability of each token and of this many
    /// alternatives (`Some(0)`: the token's own only).
    pub top_logprobs: Option<usize>,
}

/// What [`generate_requests`] reports while it runs (for streaming).
#[derive(Debug)]
pub enum Event<'a> {
    /// Sample `sample` of request `request` has a new token; `tokens` is all of
    /// its tokens so far.
    Token { request: usize, sample: usize, tokens: &'a [u32] },
    /// That sample is complete.
    Finished { request: usize, sample: usize, finish: FinishReason },
}

/// `n` samples for each prompt, decoded with the model's tokenizer.
pub fn generate(model: &Transformer, prompts: &[Vec<u32>], params: &SamplingParams) -> Result<Vec<Vec<Sample>>> {
    generate_prompts(model, prompts, params, None, 0, None)
}

/// [`generate`] with continuous batching: at most `max_rows` rows (samples)
/// decode at once (0: every prompt's at once), waiting prompts' samples
/// joining the batch in the decode loop once finished rows free a quarter
/// of it; with `at_step`, asked at every step boundary as in
/// [`generate_stepped`]. The same samples as [`generate`] (each row draws
/// from its own stream), up to float sums in other batch shapes.
pub fn generate_batched(
    model: &Transformer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    max_rows: usize,
    at_step: Option<&mut StepHook<'_>>,
) -> Result<Vec<Vec<Sample>>> {
    generate_prompts(model, prompts, params, at_step, max_rows, None)
}

/// Asked before every decode step; it may load newer weights into the
/// model (in place, as [`Transformer::load_named`] does) and then answers
/// their version, which every running row records from its next token on
/// (in-flight weight updates: a long generation picks up a new version
/// instead of finishing on the old one; the keys and values cached so far
/// stay those the old weights computed). `None`: the weights are unchanged.
pub type Refresh<'a> = dyn FnMut() -> Option<u64> + 'a;

/// [`generate_batched`] with in-flight weight updates: `refresh` is asked
/// before every decode step ([`Refresh`]), and each sample records where
/// newer weights took over ([`Sample::versions`]).
pub fn generate_refreshed(
    model: &Transformer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    max_rows: usize,
    at_step: Option<&mut StepHook<'_>>,
    refresh: &mut Refresh<'_>,
) -> Result<Vec<Vec<Sample>>> {
    generate_prompts(model, prompts, params, at_step, max_rows, Some(refresh))
}

/// Asked when a row's newest token ends a step (its text holds a line
/// break), with the request, the sample and the row's tokens so far; `true`
/// stops the row there, finished as [`FinishReason::Rejected`]. The engine
/// knows nothing of what makes a step good: the caller decides.
pub type StepHook<'a> = dyn FnMut(usize, usize, &[u32]) -> bool + 'a;

/// [`generate`] with a [`StepHook`] asked at every step boundary.
pub fn generate_stepped(
    model: &Transformer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    at_step: &mut StepHook<'_>,
) -> Result<Vec<Vec<Sample>>> {
    generate_prompts(model, prompts, params, Some(at_step), 0, None)
}

/// One request per prompt, each with its own seed mixed from `params.seed`
/// and its index, decoded with the model's tokenizer.
fn generate_prompts(
    model: &Transformer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    at_step: Option<&mut StepHook<'_>>,
    max_rows: usize,
    refresh: Option<&mut Refresh<'_>>,
) -> Result<Vec<Vec<Sample>>> {
    let tokenizer = model
        .tokenizer()
        .ok_or_else(|| Error::invalid("model", "has no tokenizer attached (Transformer::set_tokenizer)"))?;
    let requests: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request {
            prompt: p.clone(),
            params: SamplingParams { seed: mix(params.seed, i as u64), ..params.clone() },
            top_logprobs: None,
        })
        .collect();
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    check_requests(model, &requests)?;
    tch::no_grad(|| run(model, tokenizer, &requests, &mut |_| {}, &|_| false, at_step, max_rows, refresh)).map(|(samples, _)| samples)
}

/// SplitMix64 of `a` combined with `b`: independent streams per (seed, index).
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Row {
    request: usize,
    sample: usize,
    rng: ChaCha8Rng,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    top: Vec<TokenLogprobs>,
    finish: Option<FinishReason>,
    versions: Vec<(u32, u64)>,
}

/// Samples for each request, in request order; `on_event` sees every token
/// as it is produced. A request for which `cancelled` answers true (its
/// client went away) stops generating at the next token: its rows end as
/// `length` with what they have.
pub fn generate_requests(
    model: &Transformer,
    tokenizer: &Tokenizer,
    requests: &[Request],
    on_event: &mut dyn FnMut(Event),
    cancelled: &dyn Fn(usize) -> bool,
) -> Result<Vec<Vec<Sample>>> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    check_requests(model, requests)?;
    tch::no_grad(|| run(model, tokenizer, requests, on_event, cancelled, None, 0, None)).map(|(samples, _)| samples)
}

fn check_requests(model: &Transformer, requests: &[Request]) -> Result<()> {
    let max_pos = model.config().max_position_embeddings;
    let vocab = model.config().vocab_size;
    for r in requests {
        r.params.validate()?;
        if r.prompt.is_empty() {
            return Err(Error::invalid("prompt", "is empty (at least one token is needed)"));
        }
        if let Some(&bad) = r.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::invalid("prompt", format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        if r.prompt.len() + r.params.max_new_tokens > max_pos {
            return Err(Error::ContextTooLong { prompt: r.prompt.len(), new: r.params.max_new_tokens, max: max_pos });
        }
    }
    Ok(())
}

/// Prefills the prompts of `requests[take]` together (left-padded to one
/// length, logits of the last position only) into a cache with room for
/// `room` more positions, and repeats each prompt's cache rows and logits for
/// its `n` samples.
fn prefill(model: &Transformer, requests: &[Request], take: &[usize], room: usize) -> Result<(KvCache, Tensor)> {
    let device = model.device();
    let pad = model.config().pad_token_id.unwrap_or(0) as i64;
    let prompt_len = take.iter().map(|&i| requests[i].prompt.len()).max().unwrap_or(0);
    let p = take.len() as i64;
    let mut ids = vec![pad; take.len() * prompt_len];
    let mut mask = vec![0i64; take.len() * prompt_len];
    for (k, &i) in take.iter().enumerate() {
        let r = &requests[i];
        let off = k * prompt_len + prompt_len - r.prompt.len();
        for (j, &t) in r.prompt.iter().enumerate() {
            ids[off + j] = t as i64;
            mask[off + j] = 1;
        }
    }
    let padded = take.iter().any(|&i| requests[i].prompt.len() != prompt_len);
    let ids = Tensor::from_slice(&ids).view([p, prompt_len as i64]).to_device(device);
    let mask = padded.then(|| Tensor::from_slice(&mask).view([p, prompt_len as i64]).to_device(device));
    let mut cache = model.new_cache(take.len(), prompt_len + room);
    let logits = model.forward_cached(&ids, mask.as_ref(), &mut cache, true)?.squeeze_dim(1);
    let expand: Vec<i64> = take.iter().enumerate().flat_map(|(k, &i)| std::iter::repeat_n(k as i64, requests[i].params.n)).collect();
    if expand.iter().enumerate().all(|(j, &k)| j as i64 == k) {
        return Ok((cache, logits));
    }
    cache.select_rows(&expand);
    Ok((cache, logits.index_select(0, &Tensor::from_slice(&expand).to_device(device))))
}

/// The requests to start now: those next in the queue whose rows fit beside
/// `running` rows within `max_rows` (0: no limit), in order; at least one when
/// nothing runs.
fn admit(queue: &mut std::collections::VecDeque<usize>, requests: &[Request], running: usize, max_rows: usize) -> Vec<usize> {
    let mut take = Vec::new();
    let mut rows = running;
    while let Some(&i) = queue.front() {
        let n = requests[i].params.n;
        if max_rows > 0 && rows + n > max_rows && rows > 0 {
            break;
        }
        take.push(i);
        rows += n;
        queue.pop_front();
    }
    take
}

/// [`generate_requests`]' loop. With `max_rows` above 0 (continuous
/// batching), at most that many rows decode at once (a request with more
/// samples runs alone): requests start in order as rows finish and make
/// room (once a quarter of the rows is free, so that a join's prefill and
/// cache copy serve several requests), their prompts prefilled apart and
/// their rows joined to the batch in the same decode loop, so the batch
/// stays full while requests wait. Each
/// row draws from its own stream, so a row's tokens do not depend on which
/// rows it ran beside (up to float sums in other batch shapes). Returns the
/// samples and how many times requests joined rows already decoding.
fn run(
    model: &Transformer,
    tokenizer: &Tokenizer,
    requests: &[Request],
    on_event: &mut dyn FnMut(Event),
    cancelled: &dyn Fn(usize) -> bool,
    mut at_step: Option<&mut StepHook<'_>>,
    max_rows: usize,
    mut refresh: Option<&mut Refresh<'_>>,
) -> Result<(Vec<Vec<Sample>>, usize)> {
    // Whether a token's text holds a line break, per token id met.
    let mut ends_step: std::collections::HashMap<u32, bool> = std::collections::HashMap::new();
    let device = model.device();
    let max_new = requests.iter().map(|r| r.params.max_new_tokens).max().unwrap_or(0);

    let mut rows: Vec<Row> = Vec::new();
    // The index in `rows` of each request's first row.
    let mut first_row: Vec<usize> = Vec::with_capacity(requests.len());
    for (i, r) in requests.iter().enumerate() {
        first_row.push(rows.len());
        for s in 0..r.params.n {
            rows.push(Row {
                request: i,
                sample: s,
                rng: ChaCha8Rng::seed_from_u64(mix(r.params.seed, s as u64)),
                tokens: Vec::with_capacity(r.params.max_new_tokens),
                logprobs: Vec::with_capacity(r.params.max_new_tokens),
                top: Vec::new(),
                finish: None,
                versions: Vec::new(),
            });
        }
    }
    let mut queue: std::collections::VecDeque<usize> = if max_new > 0 { (0..requests.len()).collect() } else { Default::default() };
    let mut batch: Option<(KvCache, Tensor)> = None;
    // active[k] = index into `rows` of batch row k.
    let mut active: Vec<usize> = Vec::new();
    let mut joins = 0;
    // The version a refresh loaded last: rows that start after it start on it.
    let mut loaded: Option<u64> = None;
    // Decode steps and the rows they ran, for the trace.
    let (mut steps, mut row_steps) = (0usize, 0usize);
    loop {
        // Requests that fit start: prefilled apart, their rows joined to the batch.
        // Joining costs a prefill and a copy of the cache: rows join a running
        // batch once a quarter of it is free (or nothing runs), several at once.
        let free = max_rows.saturating_sub(active.len());
        let take = if active.is_empty() || free >= (max_rows / 4).max(1) { admit(&mut queue, requests, active.len(), max_rows) } else { Vec::new() };
        if !take.is_empty() {
            let joining = take.iter().flat_map(|&i| first_row[i]..first_row[i] + requests[i].params.n);
            if let Some(v) = loaded {
                for r in joining.clone() {
                    rows[r].versions.push((0, v));
                }
            }
            active.extend(joining);
            // Room for the most tokens any row of the batch may still add.
            let room = active.iter().map(|&r| requests[rows[r].request].params.max_new_tokens.saturating_sub(rows[r].tokens.len())).max().unwrap_or(0);
            // Joining rows are copied into a cache with that room; a new batch is their own.
            let (cache, logits) = prefill(model, requests, &take, if batch.is_none() { room } else { 0 })?;
            batch = Some(match batch.take() {
                None => (cache, logits),
                Some((mut running, before)) => {
                    joins += 1;
                    running.append(&cache, room);
                    (running, Tensor::cat(&[before, logits], 0))
                }
            });
        }
        let Some((cache, logits)) = batch.as_mut() else { break };
        steps += 1;
        row_steps += active.len();
        let picks = sample_step(logits, &active, &mut rows, requests)?;
        let mut any_done = false;
        for (k, pick) in picks.into_iter().enumerate() {
            let row = &mut rows[active[k]];
            let params = &requests[row.request].params;
            row.tokens.push(pick.token);
            row.logprobs.push(pick.logprob);
            if let Some(t) = pick.top {
                row.top.push(t);
            }
            on_event(Event::Token { request: row.request, sample: row.sample, tokens: &row.tokens });
            let finish = if params.eos.contains(&pick.token) {
                Some(prism_core::FinishReason::Eos)
            } else if !params.stop.is_empty() && contains_stop(tokenizer, &row.tokens, &params.stop)? {
                Some(FinishReason::Stop)
            } else if row.tokens.len() >= params.max_new_tokens {
                Some(FinishReason::Length)
            } else if let Some(hook) = at_step.as_deref_mut()
                && *ends_step.entry(pick.token).or_insert_with(|| tokenizer.token_text(pick.token).contains('\n'))
                && hook(row.request, row.sample, &row.tokens)
            {
                Some(FinishReason::Rejected)
            } else {
                None
            };
            if let Some(f) = finish {
                row.finish = Some(f);
                any_done = true;
                on_event(Event::Finished { request: row.request, sample: row.sample, finish: f });
            }
        }
        for &r in &active {
            let row = &mut rows[r];
            if row.finish.is_none() && cancelled(row.request) {
                row.finish = Some(FinishReason::Length);
                any_done = true;
            }
        }
        let keep: Vec<i64> = (0..active.len()).filter(|&k| rows[active[k]].finish.is_none()).map(|k| k as i64).collect();
        if keep.is_empty() {
            // Every row finished: what the queue still holds starts a new batch.
            active.clear();
            batch = None;
            continue;
        }
        let mut next: Vec<i64> = active.iter().map(|&r| *rows[r].tokens.last().expect("a token") as i64).collect();
        if any_done {
            cache.select_rows(&keep);
            active = keep.iter().map(|&k| active[k as usize]).collect();
            next = keep.iter().map(|&k| next[k as usize]).collect();
        }
        // Newer weights, if any, sample every running row's next token on.
        if let Some(v) = refresh.as_deref_mut().and_then(|r| r()) {
            loaded = Some(v);
            for &r in &active {
                let at = rows[r].tokens.len() as u32;
                rows[r].versions.push((at, v));
            }
        }
        let ids = Tensor::from_slice(&next).view([active.len() as i64, 1]).to_device(device);
        *logits = model.forward_cached(&ids, None, cache, true)?.squeeze_dim(1);
    }
    tracing::debug!(steps, mean_rows = row_steps as f64 / steps.max(1) as f64, joins, "generated");

    let mut out: Vec<Vec<Sample>> = requests.iter().map(|r| Vec::with_capacity(r.params.n)).collect();
    for row in rows {
        let (text, token_ends) = tokenizer.decode_with_ends(&row.tokens)?;
        let finish = row.finish.unwrap_or(FinishReason::Length);
        out[row.request].push(Sample {
            tokens: row.tokens,
            logprobs: row.logprobs,
            text,
            token_ends,
            finish,
            top_logprobs: row.top,
            versions: row.versions,
        });
    }
    Ok((out, joins))
}

fn contains_stop(tokenizer: &Tokenizer, tokens: &[u32], stop: &[String]) -> Result<bool> {
    let text = tokenizer.decode(tokens, true)?;
    Ok(stop.iter().any(|s| !s.is_empty() && text.contains(s.as_str())))
}

struct Pick {
    token: u32,
    logprob: f32,
    top: Option<TokenLogprobs>,
}

/// One token for each active row from `logits` `[B, V]` (float32).
fn sample_step(logits: &Tensor, active: &[usize], rows: &mut [Row], requests: &[Request]) -> Result<Vec<Pick>> {
    let device = logits.device();
    let (b, v) = (logits.size()[0], logits.size()[1]);
    let params = |k: usize| &requests[rows[active[k]].request].params;
    let greedy: Vec<bool> = (0..b as usize).map(|k| params(k).greedy_mode()).collect();
    let any_greedy = greedy.iter().any(|&g| g);
    let any_sampled = greedy.iter().any(|&g| !g);
    let top_n = (0..b as usize).filter_map(|k| requests[rows[active[k]].request].top_logprobs).max();
    let raw = (any_greedy || top_n.is_some()).then(|| logits.log_softmax(-1, Kind::Float));

    let mut tokens = vec![0i64; b as usize];
    let mut logprobs = vec![0f32; b as usize];
    if any_greedy {
        let raw = raw.as_ref().expect("computed for greedy rows");
        let arg = logits.argmax(-1, true);
        let lp = raw.gather(1, &arg, false);
        let arg = Vec::<i64>::try_from(arg.flatten(0, -1).to_device(tch::Device::Cpu))?;
        let lp = Vec::<f32>::try_from(lp.flatten(0, -1).to_device(tch::Device::Cpu))?;
        for k in 0..b as usize {
            if greedy[k] {
                tokens[k] = arg[k];
                logprobs[k] = lp[k];
            }
        }
    }
    if any_sampled {
        let temps: Vec<f32> = (0..b as usize).map(|k| if greedy[k] { 1.0 } else { params(k).temperature }).collect();
        let ks: Vec<i64> = (0..b as usize)
            .map(|k| match params(k).top_k {
                0 => v,
                n => (n as i64).min(v),
            })
            .collect();
        // 2.0 disables the nucleus cut: an exclusive cumulative sum never exceeds it.
        let ps: Vec<f32> = (0..b as usize).map(|k| if params(k).top_p >= 1.0 { 2.0 } else { params(k).top_p }).collect();
        let any_k = ks.iter().any(|&k| k < v);
        let any_p = ps.iter().any(|&p| p <= 1.0);
        let uniforms: Vec<f32> = (0..b as usize).map(|k| rows[active[k]].rng.random::<f64>() as f32).collect();
        let scaled = logits / Tensor::from_slice(&temps).to_device(device).unsqueeze(1);
        let u = Tensor::from_slice(&uniforms).to_device(device).unsqueeze(1);
        let (chosen, lp) = if any_k || any_p {
            let (mut sorted, order) = scaled.sort(-1, true);
            if any_k {
                let rank = Tensor::arange(v, (Kind::Int64, device)).unsqueeze(0);
                let cut = rank.ge_tensor(&Tensor::from_slice(&ks).to_device(device).unsqueeze(1));
                sorted = sorted.masked_fill(&cut, f64::NEG_INFINITY);
            }
            if any_p {
                let probs = sorted.softmax(-1, Kind::Float);
                let before = probs.cumsum(-1, Kind::Float) - &probs;
                let cut = before.gt_tensor(&Tensor::from_slice(&ps).to_device(device).unsqueeze(1));
                sorted = sorted.masked_fill(&cut, f64::NEG_INFINITY);
            }
            let logp = sorted.log_softmax(-1, Kind::Float);
            let pos = inverse_cdf(&logp, &u, v);
            (order.gather(1, &pos, false), logp.gather(1, &pos, false))
        } else {
            let logp = scaled.log_softmax(-1, Kind::Float);
            let pos = inverse_cdf(&logp, &u, v);
            let lp = logp.gather(1, &pos, false);
            (pos, lp)
        };
        let chosen = Vec::<i64>::try_from(chosen.flatten(0, -1).to_device(tch::Device::Cpu))?;
        let lp = Vec::<f32>::try_from(lp.flatten(0, -1).to_device(tch::Device::Cpu))?;
        for k in 0..b as usize {
            if !greedy[k] {
                tokens[k] = chosen[k];
                logprobs[k] = lp[k];
            }
        }
    }
    let mut tops: Vec<Option<TokenLogprobs>> = (0..b as usize).map(|_| None).collect();
    if let (Some(n), Some(raw)) = (top_n, raw.as_ref()) {
        let chosen = Tensor::from_slice(&tokens).to_device(device).unsqueeze(1);
        let own = Vec::<f32>::try_from(raw.gather(1, &chosen, false).flatten(0, -1).to_device(tch::Device::Cpu))?;
        let n = (n as i64).min(v);
        let (vals, ids) = if n > 0 { raw.topk(n, -1, true, true) } else { (raw.narrow(1, 0, 0), raw.narrow(1, 0, 0).to_kind(Kind::Int64)) };
        let vals = Vec::<f32>::try_from(vals.flatten(0, -1).to_device(tch::Device::Cpu))?;
        let ids = Vec::<i64>::try_from(ids.flatten(0, -1).to_device(tch::Device::Cpu))?;
        for k in 0..b as usize {
            if let Some(want) = requests[rows[active[k]].request].top_logprobs {
                let base = k * n as usize;
                let top = (0..want.min(n as usize)).map(|j| (ids[base + j] as u32, vals[base + j])).collect();
                tops[k] = Some(TokenLogprobs { logprob: own[k], top });
            }
        }
    }
    Ok(tokens
        .into_iter()
        .zip(logprobs)
        .zip(tops)
        .map(|((t, lp), top)| Pick { token: t as u32, logprob: lp, top })
        .collect())
}

/// Index of the first entry whose cumulative probability exceeds `u` times the
/// total: an inverse-CDF draw that never lands on a zero-probability entry.
fn inverse_cdf(logp: &Tensor, u: &Tensor, v: i64) -> Tensor {
    let cdf = logp.exp().cumsum(-1, Kind::Float);
    let total = cdf.narrow(1, v - 1, 1);
    let threshold = (u * total).clamp_min(f32::MIN_POSITIVE as f64);
    cdf.lt_tensor(&threshold).sum_dim_intlist(-1, true, Kind::Int64).clamp_max(v - 1)
}

/// Log-probabilities of `completion` following `prompt` under the model
/// (temperature 1, teacher-forced). `prompt` must not be empty.
pub fn score(model: &Transformer, prompt: &[u32], completion: &[u32]) -> Result<Vec<f32>> {
    if prompt.is_empty() {
        return Err(Error::invalid("prompt", "is empty (the first completion token needs a context)"));
    }
    if completion.is_empty() {
        return Ok(Vec::new());
    }
    let vocab = model.config().vocab_size;
    if let Some(&bad) = prompt.iter().chain(completion).find(|&&t| t as usize >= vocab) {
        return Err(Error::invalid("tokens", format!("token id {bad} is outside the vocabulary of {vocab}")));
    }
    let ids: Vec<i64> = prompt.iter().chain(completion).map(|&t| t as i64).collect();
    let (p, c) = (prompt.len() as i64, completion.len() as i64);
    tch::no_grad(|| {
        let input = Tensor::from_slice(&ids).view([1, p + c]).to_device(model.device());
        let logits = model.forward(&input, None);
        let logp = logits.narrow(1, p - 1, c).log_softmax(-1, Kind::Float);
        let target = Tensor::from_slice(&ids[prompt.len()..]).view([1, c, 1]).to_device(model.device());
        let lp = logp.gather(2, &target, false).flatten(0, -1).to_device(tch::Device::Cpu);
        Ok(Vec::<f32>::try_from(lp)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In-flight weight updates: a generation that newer weights reach
    /// after its third decode step samples its first tokens as the old
    /// weights alone would (same tokens, same log-probs), records from which
    /// token the new version sampled, and samples on with the new weights
    /// (the rest differs from the old weights' run); rows that join the batch
    /// afterwards start on the new version.
    #[test]
    fn a_generation_picks_up_newer_weights_between_decode_steps() {
        let load = |seed| crate::load("builtin:tiny-arith", &crate::LoadOptions { seed, ..Default::default() }).unwrap();
        let (old, new) = (load(21), load(22));
        let tokenizer = &old.tokenizer;
        let prompts: Vec<Vec<u32>> = ["Q:1+2\n", "Q:7+3*4-2\n", "Q:9*9\n"].iter().map(|t| tokenizer.encode(t, true).unwrap()).collect();
        let params = SamplingParams { n: 2, temperature: 1.0, max_new_tokens: 12, seed: 5, ..Default::default() };
        let alone = generate_batched(&old.model, &prompts, &params, 4, None).unwrap();
        let model = load(21).model;
        let mut steps = 0;
        let mut refresh = || {
            steps += 1;
            (steps == 3).then(|| {
                model.load_named(new.model.var_store().variables()).unwrap();
                9
            })
        };
        let got = generate_refreshed(&model, &prompts, &params, 4, None, &mut refresh).unwrap();
        let (mut switched, mut joined) = (0, 0);
        for (g, a) in got.iter().flatten().zip(alone.iter().flatten()) {
            match g.versions.as_slice() {
                [] => assert_eq!((&g.tokens, &g.logprobs), (&a.tokens, &a.logprobs), "a sample the new weights never reached"),
                [(0, 9)] => joined += 1,
                [(at, 9)] => {
                    let at = *at as usize;
                    assert_eq!(at, 3, "the third step's refresh samples the fourth token on");
                    assert_eq!((&g.tokens[..at], &g.logprobs[..at]), (&a.tokens[..at], &a.logprobs[..at]));
                    assert_ne!((&g.tokens[at..], &g.logprobs[at..]), (&a.tokens[at..], &a.logprobs[at..]), "the new weights sampled the rest");
                    switched += 1;
                }
                other => panic!("versions {other:?}"),
            }
        }
        assert_eq!(switched, 4, "the four rows running at the switch");
        assert_eq!(joined, 2, "the two rows that joined after it");
    }

    /// Continuous batching: with room for fewer rows than the requests
    /// hold, requests join rows already decoding (of other lengths, left
    /// padding on either side of the join) and every sample is the one the
    /// whole batch at once gives: same tokens, log-probs within 1e-4, same
    /// finish. Rows end early on eos ids and stop strings, at other times.
    #[test]
    fn requests_joining_a_running_batch_sample_what_one_batch_samples() {
        let loaded = crate::load("builtin:tiny-arith", &crate::LoadOptions { seed: 21, ..Default::default() }).unwrap();
        let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
        let texts = ["Q:1+2\n", "Q:7+3*4-2\n", "Q:9\n", "Q:12*12-100+5\n", "Q:3*3\n", "Q:40-1\n", "Q:8+8+8\n"];
        let eos: Vec<u32> = tokenizer.encode("37", false).unwrap();
        let requests: Vec<Request> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| Request {
                prompt: tokenizer.encode(t, true).unwrap(),
                params: SamplingParams {
                    n: 1 + i % 3,
                    temperature: 1.0,
                    max_new_tokens: 6 + 3 * i,
                    stop: if i % 2 == 0 { vec!["5".into()] } else { Vec::new() },
                    eos: eos.clone(),
                    seed: 100 + i as u64,
                    ..Default::default()
                },
                top_logprobs: None,
            })
            .collect();
        let go = |max_rows: usize| tch::no_grad(|| run(model, tokenizer, &requests, &mut |_| {}, &|_| false, None, max_rows, None)).unwrap();
        let (whole, none) = go(0);
        assert_eq!(none, 0);
        let mut finishes: Vec<FinishReason> = whole.iter().flatten().map(|s| s.finish).collect();
        finishes.dedup_by_key(|f| format!("{f:?}"));
        finishes.sort_by_key(|f| format!("{f:?}"));
        finishes.dedup();
        assert!(finishes.len() >= 2, "rows end in more than one way: {finishes:?}");
        for max_rows in [2, 3, 5] {
            let (joined, joins) = go(max_rows);
            assert!(joins > 0, "max_rows {max_rows}: requests joined a running batch");
            for (i, (a, b)) in whole.iter().zip(&joined).enumerate() {
                assert_eq!(a.len(), b.len());
                for (x, y) in a.iter().zip(b) {
                    assert_eq!(x.tokens, y.tokens, "max_rows {max_rows}, request {i}");
                    assert_eq!(x.finish, y.finish, "max_rows {max_rows}, request {i}");
                    for (p, q) in x.logprobs.iter().zip(&y.logprobs) {
                        assert!((p - q).abs() < 1e-4, "max_rows {max_rows}, request {i}: {p} vs {q}");
                    }
                }
            }
        }
    }
}
