//! Fewer wasted groups. A group whose samples all pass or all fail has zero
//! advantage under GRPO and is dropped: its rollout compute teaches nothing
//! (75–81% of the embedded default's samples, issue 19). The curriculum
//! watches each retired group's pass rate and, when `task.adaptive.enabled`:
//!
//! - **datasets**: a prompt whose last `u` groups in a row were uniform is
//!   skipped with probability `skip_max · (1 − 2^−u)`: one uniform group
//!   halves the maximum, evidence pushes it toward `skip_max`, and since
//!   `skip_max < 1` a skipped prompt still comes back now and then (a mixed
//!   group resets its count). The draw is a hash of the seed and the prompt
//!   index, so a resumed run skips the same prompts.
//! - **arithmetic**: a difficulty level adds operators to every new problem
//!   (`task.arithmetic.operators` shifted up by the level, at most 8). After
//!   each window of `window` retired groups, the level goes up one when their
//!   mean pass rate is above `target + band`, down one when below
//!   `target − band` (the pass rate nearest ½ maximises the chance that a
//!   group of G is mixed: 1 − p^G − (1−p)^G).
//!
//! Whether enabled or not, it counts retired and uniform groups (the share
//! of uniform groups in `metrics.jsonl` is the waste either way).

use crate::rng::hash64;
use prism_core::config::{check, Invalid};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `[task.adaptive]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Skip prompts (datasets) or adapt the difficulty (arithmetic). Default false.
    pub enabled: bool,
    /// Arithmetic: the group pass rate the difficulty aims at. Default 0.5.
    pub target: f64,
    /// Arithmetic: no change while the window's pass rate is within target ± band. Default 0.15.
    pub band: f64,
    /// Arithmetic: retired groups per difficulty decision. Default 32.
    pub window: u32,
    /// Arithmetic: most operators the difficulty adds. Default 5.
    pub max_level: u32,
    /// Datasets: the highest probability of skipping a prompt (below 1, so
    /// every prompt comes back). Default 0.9.
    pub skip_max: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self { enabled: false, target: 0.5, band: 0.15, window: 32, max_level: 5, skip_max: 0.9 }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), Invalid> {
        check::in_range("task.adaptive.target", self.target, 0.0, 1.0)?;
        check::in_range("task.adaptive.band", self.band, 0.0, 0.5)?;
        check::positive("task.adaptive.window", self.window)?;
        check::in_range("task.adaptive.max_level", self.max_level, 0, 7)?;
        if !(0.0..1.0).contains(&self.skip_max) {
            return Err(Invalid::new("task.adaptive.skip_max", self.skip_max, "must be in [0, 1): a prompt must be able to come back"));
        }
        Ok(())
    }
}

/// What a checkpoint keeps of the curriculum (resume continues it exactly).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    /// Operators the arithmetic difficulty adds.
    pub level: u32,
    /// Pass rates summed over the current window, and their count.
    pub window_sum: f64,
    pub window_groups: u32,
    /// Dataset rows whose latest groups were uniform: how many in a row.
    pub uniform_streak: BTreeMap<u32, u32>,
    /// Prompts skipped so far.
    pub skipped: u64,
    /// Groups retired with a known pass rate, and how many were uniform.
    pub groups: u64,
    pub uniform_groups: u64,
}

/// The curriculum of one run's prompt stream.
#[derive(Debug, Clone)]
pub struct Curriculum {
    cfg: Config,
    seed: u64,
    state: State,
}

impl Curriculum {
    /// A curriculum for the stream seeded by `seed`, continuing `state` (a
    /// checkpoint's) when given.
    pub fn new(cfg: &Config, seed: u64, state: Option<State>) -> Self {
        Self { cfg: cfg.clone(), seed, state: state.unwrap_or_default() }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Whether it skips prompts and sets the difficulty (`task.adaptive.enabled`).
    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    /// Operators the arithmetic difficulty adds to new problems (0 when off).
    pub fn level(&self) -> u32 {
        if self.cfg.enabled { self.state.level } else { 0 }
    }

    /// A retired group of the prompt at dataset `row` (`None` for generated
    /// problems) whose samples passed at `pass_rate` (share correct).
    pub fn observe(&mut self, row: Option<u32>, pass_rate: f32) {
        let s = &mut self.state;
        let uniform = pass_rate <= 0.0 || pass_rate >= 1.0;
        s.groups += 1;
        s.uniform_groups += u64::from(uniform);
        if let Some(row) = row.filter(|_| self.cfg.enabled) {
            if uniform {
                *s.uniform_streak.entry(row).or_default() += 1;
            } else {
                s.uniform_streak.remove(&row);
            }
        }
        if row.is_some() || !self.cfg.enabled {
            return;
        }
        s.window_sum += f64::from(pass_rate.clamp(0.0, 1.0));
        s.window_groups += 1;
        if s.window_groups >= self.cfg.window {
            let mean = s.window_sum / f64::from(s.window_groups);
            if mean > self.cfg.target + self.cfg.band && s.level < self.cfg.max_level {
                s.level += 1;
            } else if mean < self.cfg.target - self.cfg.band && s.level > 0 {
                s.level -= 1;
            }
            (s.window_sum, s.window_groups) = (0.0, 0);
        }
    }

    /// Whether to skip prompt number `index`, at dataset `row`; counts a skip.
    pub fn skip(&mut self, index: u64, row: u32) -> bool {
        if !self.cfg.enabled {
            return false;
        }
        let Some(&streak) = self.state.uniform_streak.get(&row) else {
            return false;
        };
        let p = self.cfg.skip_max * (1.0 - 0.5f64.powi(streak.min(60) as i32));
        let draw = (hash64(&[self.seed, index, 0x5c1f]) >> 11) as f64 / (1u64 << 53) as f64;
        let skip = draw < p;
        self.state.skipped += u64::from(skip);
        skip
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> Config {
        Config { enabled: true, window: 4, ..Config::default() }
    }

    #[test]
    fn the_difficulty_follows_the_pass_rate_one_window_at_a_time() {
        let mut c = Curriculum::new(&on(), 0, None);
        for rate in [1.0, 1.0, 0.875, 1.0] {
            c.observe(None, rate);
        }
        assert_eq!(c.level(), 1, "mean 0.97 > 0.65: harder");
        for _ in 0..3 {
            c.observe(None, 1.0);
        }
        assert_eq!(c.level(), 1, "no decision before the window is full");
        c.observe(None, 1.0);
        assert_eq!(c.level(), 2);
        for rate in [0.5, 0.625, 0.375, 0.5] {
            c.observe(None, rate);
        }
        assert_eq!(c.level(), 2, "within the band: stay");
        for _ in 0..4 {
            c.observe(None, 0.0);
        }
        assert_eq!(c.level(), 1, "mean 0 < 0.35: easier");
        for _ in 0..40 {
            c.observe(None, 0.0);
        }
        assert_eq!(c.level(), 0, "never below 0");
        for _ in 0..400 {
            c.observe(None, 1.0);
        }
        assert_eq!(c.level(), 5, "never above max_level");
        assert_eq!(c.state().groups, 456);
        assert_eq!(c.state().uniform_groups, 451);
    }

    #[test]
    fn off_it_counts_but_never_adapts() {
        let mut c = Curriculum::new(&Config::default(), 0, None);
        for _ in 0..100 {
            c.observe(None, 1.0);
            c.observe(Some(3), 0.0);
        }
        assert_eq!(c.level(), 0);
        assert!((0..1000).all(|i| !c.skip(i, 3)));
        assert_eq!((c.state().groups, c.state().uniform_groups, c.state().skipped), (200, 200, 0));
        assert!(c.state().uniform_streak.is_empty(), "no per-prompt state kept while off");
    }

    /// The skip probability grows with the uniform streak toward skip_max,
    /// never reaches 1, and a mixed group resets it.
    #[test]
    fn uniform_prompts_are_skipped_more_as_evidence_grows_and_come_back() {
        let mut c = Curriculum::new(&on(), 7, None);
        let share = |c: &mut Curriculum, row| (0..20_000u64).filter(|&i| c.skip(i, row)).count() as f64 / 20_000.0;
        assert_eq!(share(&mut c, 5), 0.0, "no evidence, no skip");
        c.observe(Some(5), 1.0);
        let one = share(&mut c, 5);
        assert!((one - 0.45).abs() < 0.02, "{one}");
        for _ in 0..9 {
            c.observe(Some(5), 0.0);
        }
        let ten = share(&mut c, 5);
        assert!((ten - 0.9 * (1.0 - 0.5f64.powi(10))).abs() < 0.02 && ten < 0.95, "{ten}");
        c.observe(Some(5), 0.5);
        assert_eq!(share(&mut c, 5), 0.0, "a mixed group: the prompt is back");
        assert!(c.state().uniform_streak.is_empty());
    }

    /// The state a checkpoint keeps continues the curriculum exactly: the
    /// same skips, the same level.
    #[test]
    fn a_restored_curriculum_continues_exactly() {
        let mut a = Curriculum::new(&on(), 3, None);
        for i in 0..10u32 {
            a.observe(Some(i % 3), if i % 4 == 0 { 0.5 } else { 1.0 });
            a.observe(None, 1.0);
        }
        a.skip(1, 1);
        let json = serde_json::to_value(a.state()).unwrap();
        let mut b = Curriculum::new(&on(), 3, Some(serde_json::from_value(json).unwrap()));
        assert_eq!(a.state(), b.state());
        let skips = |c: &mut Curriculum| (100..200u64).map(|i| c.skip(i, (i % 3) as u32)).collect::<Vec<_>>();
        assert_eq!(skips(&mut a), skips(&mut b));
        for _ in 0..4 {
            a.observe(None, 1.0);
            b.observe(None, 1.0);
        }
        assert_eq!((a.level(), a.state()), (b.level(), b.state()));
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let bad = Config { skip_max: 1.0, ..Config::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("task.adaptive.skip_max"));
        let bad = Config { window: 0, ..Config::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("task.adaptive.window"));
    }
}
