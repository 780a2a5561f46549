//! The live progress line of `prism train`: a redrawn bar on a terminal, plain
//! lines (at most one every few seconds) otherwise.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use prism_actors::Progress;
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Where the run stops: after `max_steps` versions or `time_limit`, whichever first.
#[derive(Debug, Clone, Copy)]
pub struct Goal {
    pub first_step: u64,
    pub max_steps: u64,
    pub time_limit: Option<Duration>,
}

/// One line describing `p`.
pub fn line(p: &Progress, goal: &Goal) -> String {
    let pct = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{:.1}%", v * 100.0));
    let eta = eta(p, goal).map_or("—".to_string(), |d| format!("{}s", d.as_secs()));
    format!(
        "step {}/{} | reward {} | held-out {} | step acc {} | lag {} | {:.0} tok/s{} | ETA {}",
        p.step,
        goal.max_steps,
        p.reward.map_or("—".to_string(), |r| format!("{r:.3}")),
        pct(p.eval_accuracy),
        pct(p.step_accuracy),
        p.mean_lag.map_or("—".to_string(), |l| format!("{l:.2}")),
        p.tokens_per_s,
        judge(p),
        eta
    )
}

/// ` | judge 37% agree 91%` when a judge is configured (it reports a share;
/// ` distilled 60%` too with a distilled model, whose scores background
/// annotation labels with),
/// ` | judge OFF (canaries)` while the canary gate has turned its scores off;
/// nothing otherwise. The distiller's agreement is left out until measured.
fn judge(p: &Progress) -> String {
    let state = match (p.judge_trusted, p.judge_share) {
        (Some(false), _) => "OFF (canaries)".to_string(),
        (_, Some(share)) => format!("{:.0}%", share * 100.0),
        (_, None) => return String::new(),
    };
    let distilled = p.distilled_share.map_or(String::new(), |d| format!(" distilled {:.0}%", d * 100.0));
    let agree = p.distill_agreement.map_or(String::new(), |a| format!(" agree {:.0}%", a * 100.0));
    format!(" | judge {state}{distilled}{agree}")
}

fn eta(p: &Progress, goal: &Goal) -> Option<Duration> {
    let done = p.step.saturating_sub(goal.first_step);
    let by_steps = (done > 0).then(|| {
        let per_step = p.elapsed_s / done as f64;
        Duration::from_secs_f64(per_step * goal.max_steps.saturating_sub(p.step) as f64)
    });
    let by_time = goal.time_limit.map(|t| t.saturating_sub(Duration::from_secs_f64(p.elapsed_s)));
    match (by_steps, by_time) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Draws progress until the sender is dropped.
pub fn spawn(mut rx: watch::Receiver<Progress>, goal: Goal) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let terminal = std::io::stderr().is_terminal();
        let bar = terminal.then(|| {
            let b = ProgressBar::with_draw_target(Some(goal.max_steps), ProgressDrawTarget::stderr());
            b.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        let mut last_print = Instant::now() - Duration::from_secs(60);
        let mut last_step = u64::MAX;
        while rx.changed().await.is_ok() {
            let p = rx.borrow_and_update().clone();
            let text = line(&p, &goal);
            match &bar {
                Some(b) => {
                    b.set_position(p.step);
                    b.set_message(text);
                }
                None => {
                    if p.step != last_step && last_print.elapsed() >= Duration::from_secs(5) {
                        eprintln!("{text}");
                        last_print = Instant::now();
                        last_step = p.step;
                    }
                }
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_every_field() {
        let p = Progress {
            step: 10,
            reward: Some(0.5),
            eval_accuracy: Some(0.42),
            step_accuracy: Some(0.9),
            mean_lag: Some(1.0),
            tokens_per_s: 1234.4,
            elapsed_s: 20.0,
            ..Default::default()
        };
        let goal = Goal { first_step: 0, max_steps: 100, time_limit: Some(Duration::from_secs(60)) };
        // 2 s/step × 90 steps = 180 s by steps; 40 s left by time: the sooner wins.
        assert_eq!(line(&p, &goal), "step 10/100 | reward 0.500 | held-out 42.0% | step acc 90.0% | lag 1.00 | 1234 tok/s | ETA 40s");
        let empty = line(&Progress::default(), &Goal { first_step: 0, max_steps: 5, time_limit: None });
        assert_eq!(empty, "step 0/5 | reward — | held-out — | step acc — | lag — | 0 tok/s | ETA —");
    }

    #[test]
    fn line_shows_the_judge_share_and_agreement_when_a_judge_is_configured() {
        let goal = Goal { first_step: 0, max_steps: 100, time_limit: None };
        let judged =
            Progress { step: 1, judge_share: Some(0.374), distill_agreement: Some(0.912), judge_trusted: Some(true), ..Default::default() };
        assert!(line(&judged, &goal).contains("| 0 tok/s | judge 37% agree 91% | ETA "), "{}", line(&judged, &goal));
        // The distiller has not been measured yet (or distillation is off).
        let early = Progress { judge_share: Some(1.0), ..Default::default() };
        assert!(line(&early, &goal).contains("| 0 tok/s | judge 100% | ETA"), "{}", line(&early, &goal));
        // The canary gate turned judge scores off: the share (zero) says less than that.
        let off = Progress { judge_share: Some(0.0), distill_agreement: Some(0.8), judge_trusted: Some(false), ..Default::default() };
        assert!(line(&off, &goal).contains("| judge OFF (canaries) agree 80% |"), "{}", line(&off, &goal));
        // Background annotation: labels come from the distilled model.
        let background = Progress {
            judge_share: Some(0.0),
            distilled_share: Some(0.957),
            distill_agreement: Some(0.86),
            judge_trusted: Some(true),
            ..Default::default()
        };
        assert!(line(&background, &goal).contains("| judge 0% distilled 96% agree 86% |"), "{}", line(&background, &goal));
        // No judge configured: no judge field at all.
        let none = Progress { judge_trusted: Some(true), ..Default::default() };
        assert!(!line(&none, &goal).contains("judge"), "{}", line(&none, &goal));
    }
}
