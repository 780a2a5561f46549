//! The SFT warm start before RL: imitate demonstrations for a number of
//! steps with a constant learning rate, and keep the result in a cache folder
//! named by everything that shapes the weights but the number of steps, so
//! that a later run with the same settings loads it, and a longer warm start
//! continues from the longest shorter one (the same demonstrations in the same
//! order; the optimizer's moments start afresh, as they are not cached).
//!
//! Where demonstrations come from and how the policy is evaluated along the
//! way are the caller's (closures): this module knows no task.

use crate::sft::TokenPair;
use crate::{Config, Error, Learner, Policy, Result};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// What a warm start trains with.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Demonstrations per step.
    pub batch: usize,
    /// The constant learning rate.
    pub lr: f64,
    /// Evaluate every this many steps and after the last; 0 = never.
    pub eval_every: u64,
    pub seed: u64,
}

impl Plan {
    /// `base` (the run's learner settings: AdamW moments, weight decay, the
    /// gradient clip) made an SFT step at this plan's learning rate, constant,
    /// without KL, one micro-batch per step, of the whole model (a LoRA run's
    /// adapters are attached to the warm-started model after it).
    pub fn sft_config(&self, base: &Config) -> Config {
        let mut sft = base.clone();
        sft.lora = None;
        sft.mode = crate::config::Mode::Sft;
        sft.lr = self.lr;
        sft.schedule = crate::config::Schedule::Constant;
        sft.warmup_steps = 0;
        sft.kl_coef = 0.0;
        sft.micro_batch_size = self.batch as u32;
        sft
    }
}

/// The cache folder of a warm start of `steps` steps with settings `key` (a
/// hash of everything that shapes the weights but the number of steps) under
/// `root`: `<root>/warmstart-<first 16 hex of key>-<steps>`.
pub fn cache_dir(root: &Path, key: &str, steps: u64) -> PathBuf {
    root.join(format!("{}{steps}", stem(key)))
}

fn stem(key: &str) -> String {
    format!("warmstart-{}-", &key[..key.len().min(16)])
}

/// Whether `dir` holds a finished warm start.
pub fn is_cached(dir: &Path) -> bool {
    dir.join("model.safetensors").is_file()
}

/// The longest finished warm start with settings `key` under `root` that is
/// shorter than `steps`, as (its steps, its folder).
pub fn longest_shorter(root: &Path, key: &str, steps: u64) -> Option<(u64, PathBuf)> {
    let stem = stem(key);
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let done: u64 = e.file_name().to_str()?.strip_prefix(&stem)?.parse().ok()?;
            (done < steps && is_cached(&e.path())).then(|| (done, e.path()))
        })
        .max_by_key(|(done, _)| *done)
}

/// Trains `policy` on `steps` (step `s` imitates demonstrations `s·batch ..
/// (s+1)·batch`, made by `demonstration`), calling `evaluate(step done,
/// loss, policy)` every `plan.eval_every` steps and after the last, and
/// returns the trained policy.
pub fn train<P: Policy>(
    plan: &Plan,
    base: &Config,
    policy: P,
    steps: Range<u64>,
    mut demonstration: impl FnMut(u64) -> Result<TokenPair>,
    mut evaluate: impl FnMut(u64, f64, &P) -> Result<()>,
) -> Result<P> {
    let mut learner = Learner::new(plan.sft_config(base), policy, None, plan.seed)?;
    let last = steps.end;
    for step in steps {
        let first = step * plan.batch as u64;
        let pairs = (first..first + plan.batch as u64).map(&mut demonstration).collect::<Result<Vec<_>>>()?;
        let stats = learner.sft_step(&pairs)?;
        let done = step + 1;
        if step % 100 == 0 || done == last {
            tracing::info!(step, loss = stats.loss, "warm start");
        }
        if plan.eval_every > 0 && (done % plan.eval_every == 0 || done == last) {
            evaluate(done, stats.loss, learner.policy())?;
        }
    }
    Ok(learner.into_policy())
}

/// Stores a finished warm start in `dir` by `write` (which fills a folder),
/// through a temporary folder beside it renamed at the end, so that a
/// half-written cache is never taken for a finished one. Another run that
/// stored the same warm start meanwhile wins; theirs is as good.
pub fn store(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    write(&tmp)?;
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    match std::fs::rename(&tmp, dir) {
        Ok(()) => Ok(()),
        Err(_) if is_cached(dir) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => Err(io(dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_folder_name_is_pinned() {
        // Runs find the warm starts earlier runs made by this name.
        let key = "0123456789abcdef0123456789abcdef";
        assert_eq!(cache_dir(Path::new("runs/cache"), key, 1200), Path::new("runs/cache/warmstart-0123456789abcdef-1200"));
    }

    #[test]
    fn the_longest_shorter_finished_warm_start_is_found() {
        let root = tempfile::tempdir().unwrap();
        let key = "feedfacefeedfacefeedface";
        for (steps, finished) in [(100, true), (300, true), (500, false), (900, true)] {
            let dir = cache_dir(root.path(), key, steps);
            std::fs::create_dir_all(&dir).unwrap();
            if finished {
                std::fs::write(dir.join("model.safetensors"), b"x").unwrap();
            }
        }
        // Another key's folder is never taken.
        let other = cache_dir(root.path(), "0000000000000000", 700);
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("model.safetensors"), b"x").unwrap();
        assert_eq!(longest_shorter(root.path(), key, 800), Some((300, cache_dir(root.path(), key, 300))));
        assert_eq!(longest_shorter(root.path(), key, 100), None);
        assert_eq!(longest_shorter(root.path(), key, 1000).map(|(s, _)| s), Some(900));
    }

    #[test]
    fn a_store_that_fails_leaves_no_finished_cache() {
        let root = tempfile::tempdir().unwrap();
        let dir = cache_dir(root.path(), "abcdefabcdefabcd", 10);
        let err = store(&dir, |_| Err(Error::Model("disk full".into()))).unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert!(!is_cached(&dir));
        store(&dir, |tmp| {
            std::fs::create_dir_all(tmp).unwrap();
            std::fs::write(tmp.join("model.safetensors"), b"w").unwrap();
            Ok(())
        })
        .unwrap();
        assert!(is_cached(&dir));
    }
}
