//! `prism bench rollout`: the rollout engine on the run's own task and model,
//! every prompt of a batch at once (`rollout.max_batch_rows = 0`) against
//! continuous batching (at most `--max-rows` samples decoding, waiting
//! groups joining as samples finish), alternated in one command on the same
//! prompts and seeds: samples and completion tokens per second.

use crate::config::Config;
use anyhow::Context;
use prism_core::{GroupId, PolicyVersion, Prompt};
use prism_rollout::sampler;
use std::time::Instant;

/// Options of `prism bench rollout`.
#[derive(Debug, Clone, clap::Args)]
pub struct RolloutArgs {
    #[command(flatten)]
    pub common: crate::config::ConfigArgs,
    /// Prompts sampled per measurement (`rollout.group_size` samples each).
    #[arg(long, default_value_t = 64)]
    pub prompts: usize,
    /// Continuous batching: samples decoding at once (default: one batch's,
    /// `rollout.prompts_per_batch × rollout.group_size`).
    #[arg(long)]
    pub max_rows: Option<usize>,
    /// Prompts per engine call with continuous batching (default: all of them).
    #[arg(long)]
    pub prompts_per_call: Option<usize>,
    /// Rounds of both ways; each way's best round counts.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Torch intra-op threads (default: `train.threads`, else all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn rollout(config: &Config, args: &RolloutArgs) -> anyhow::Result<()> {
    let threads = args.threads.or((config.train.threads > 0).then_some(config.train.threads));
    if let Some(t) = threads {
        tch::set_num_threads(t as i32);
    }
    let loaded = crate::train::load_model(config)?;
    let task = crate::train::task(config, &loaded.tokenizer)?;
    let eos = loaded.generation.eos_token_ids.clone();
    let prompts: Vec<Prompt> = (0..args.prompts as u64).map(|i| task.train_prompt(i)).collect();
    let work: Vec<(GroupId, &Prompt)> = prompts.iter().enumerate().map(|(i, p)| (GroupId(i as u64), p)).collect();
    let r = &config.rollout;
    let rows = args.max_rows.unwrap_or(r.prompts_per_batch * r.group_size);
    anyhow::ensure!(rows > 0 && args.prompts > 0, "--max-rows and --prompts must be at least 1");
    let per_call = args.prompts_per_call.unwrap_or(args.prompts).max(1);
    // One way: its prompts in calls of `chunk`, each call's samples `max_rows` at a time.
    let run = |chunk: usize, max_rows: usize| -> anyhow::Result<(f64, usize, usize)> {
        let cfg = prism_rollout::Config { max_batch_rows: max_rows, ..r.clone() };
        let started = Instant::now();
        let (mut samples, mut tokens) = (0, 0);
        for (k, part) in work.chunks(chunk).enumerate() {
            let groups = sampler::sample_groups(&loaded.model, &loaded.tokenizer, part, &cfg, &eos, PolicyVersion(k as u64), config.run.seed, None, None)
                .context("sampling")?;
            samples += groups.iter().map(Vec::len).sum::<usize>();
            tokens += groups.iter().flatten().map(|t| t.tokens.len()).sum::<usize>();
        }
        Ok((started.elapsed().as_secs_f64(), samples, tokens))
    };
    let ways = [("one batch at a time", r.prompts_per_batch, 0), ("continuous", per_call, rows)];
    let mut best = [(f64::INFINITY, 0, 0); 2];
    for _ in 0..args.rounds.max(1) {
        for (i, &(_, chunk, max_rows)) in ways.iter().enumerate() {
            let got = run(chunk, max_rows)?;
            if got.0 < best[i].0 {
                best[i] = got;
            }
        }
    }
    println!(
        "prism bench rollout: {} ({}), {} prompts x {} samples, at most {} new tokens, {} threads, best of {} rounds",
        config.model.source,
        config.task.kind,
        args.prompts,
        r.group_size,
        r.max_new_tokens,
        tch::get_num_threads(),
        args.rounds.max(1)
    );
    println!("{:<52}{:>12}{:>12}{:>14}", "", "seconds", "samples/s", "tokens/s");
    for ((name, chunk, max_rows), (s, n, t)) in ways.iter().zip(best) {
        let how = match max_rows {
            0 => format!("{name}: {chunk} prompts per call"),
            m => format!("{name}: {chunk} prompts per call, {m} rows"),
        };
        println!("{how:<52}{s:>12.2}{:>12.1}{:>14.1}", n as f64 / s, t as f64 / s);
    }
    println!("continuous / one batch at a time: {:.2}x samples per second", best[0].0 / best[1].0);
    Ok(())
}
