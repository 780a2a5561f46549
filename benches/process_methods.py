"""The process-reward methods of issue 20, each switched on alone against the
embedded default (TP-GRPO with the arithmetic step checker), on this machine
with the release binary. Per seed, after the cached warm start, --rl-seconds of
RL per method:

  default    the embedded default;
  fapo       learner.flawed_positive = "fapo";
  renorm     learner.advantage = "process", process_norm = "renorm" (outcome
             weight 1: calibrated process credit on top of GRPO's);
  reject     rollout.reject_below = 0.5 (early rejection by the step checker);
  implicit   reward.process = "implicit" (beta 0.5, lr 1e-4: PRIME's 1e-6 does
             not move the tiny model);
  judge      the realistic judge (`prism bench judge-server`, as in
             process_rewards.py) annotating in the background, distilled;
  vote       judge with 3 samples at temperature 0.7, judge.vote = "majority";
  meta       judge with judge.meta_critique = true;
  consensus  judge with distill.consensus = true;
  adaptive   task.adaptive.enabled = true (issue 19: the arithmetic difficulty
             follows the group pass rate; not a process-reward method, measured
             with the same harness).

    python3 benches/process_methods.py [--seeds 0,1,2] [--rl-seconds 300] \
        [--methods default,fapo,...] [--out DIR]

Prints one table: held-out gain, seconds to +10 points, trained samples/s and
rollout tokens per trained sample, with the mean over seeds; writes
DIR/results.json. A run whose log in DIR shows it finished is reused.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from process_rewards import PRISM, ROOT, JudgeServer, add_judge_args, train  # noqa: E402

METHODS = {
    "default": [],
    "fapo": ["learner.flawed_positive=fapo"],
    "renorm": ["learner.advantage=process", "learner.process_norm=renorm", "learner.process_outcome_weight=1.0"],
    "reject": ["rollout.reject_below=0.5"],
    "implicit": ["reward.process=implicit", "implicit.beta=0.5", "implicit.lr=1e-4", "pipeline.reward_workers=16"],
    "judge": [],
    "vote": ["judge.samples=3", "judge.temperature=0.7", "judge.vote=majority"],
    "meta": ["judge.meta_critique=true"],
    "consensus": ["distill.consensus=true"],
    "adaptive": ["task.adaptive.enabled=true"],
}
NEEDS_JUDGE = {"judge", "vote", "meta", "consensus"}


def uniform_share(steps):
    rows = [r for r in steps if r.get("retired_groups")]
    retired = sum(r["retired_groups"] for r in rows)
    if not retired:
        return None
    return sum(r["retired_groups"] * (r.get("uniform_share") or 0.0) for r in rows) / retired


def measure(summary, rows):
    steps = [r for r in rows if r.get("kind") == "step"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    start = summary["start_accuracy"]
    to_ten = next((r["time_s"] for r in evals if r["eval_accuracy"] >= start + 0.10 - 1e-9), None)
    trained = summary["ledger"]["trained"]
    last = steps[-1] if steps else {}
    rollout_tokens = last.get("rollout_tokens_per_s", 0.0) * last.get("time_s", 0.0)
    return {
        "steps": len(steps),
        "gain_points": 100 * (summary["final_accuracy"] - start),
        "start_accuracy": start,
        "final_accuracy": summary["final_accuracy"],
        "seconds_to_plus_10": to_ten,
        "trained_per_s": trained / summary["rl_wall_s"],
        "rollout_tokens_per_trained": rollout_tokens / trained if trained else None,
        "rejected": summary["ledger"].get("rejected", 0),
        # Share of the retired groups whose samples all passed or all failed
        # (rows written by binaries that record it), and the last difficulty.
        "uniform_share": uniform_share(steps),
        "difficulty": last.get("difficulty"),
        # Share of the sampled trajectories dropped in zero-advantage groups.
        "wasted_share": summary["ledger"].get("dropped", {}).get("zero_advantage", 0) / max(1, summary["ledger"]["made"]),
        "balanced": summary["balanced"],
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rl-seconds", type=float, default=300)
    p.add_argument("--methods", default=",".join(METHODS))
    add_judge_args(p)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-process-methods"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not os.path.exists(PRISM):
        sys.exit("build first: cargo build --release")
    results = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        base = [f"run.seed={seed}", f"train.time_limit_s={args.rl_seconds}"]
        for method in args.methods.split(","):
            name = f"{method}-seed{seed}"
            sets = base + METHODS[method]
            judge = None
            if method in NEEDS_JUDGE:
                judge = JudgeServer(args, seed, os.path.join(args.out, f"{name}.judge.log"))
                sets += [
                    "reward.process=judge", "reward.fallback=distilled", "reward.judge_wait_ms=0",
                    "distill.enabled=true", f"judge.url={judge.url}", "judge.template=thinkprm",
                    f"judge.concurrency={args.concurrency}",
                ]
            _, summary, rows, _ = train(args.out, name, sets)
            if judge:
                judge.stop()
            results[name] = measure(summary, rows)
            json.dump(results, open(os.path.join(args.out, "results.json"), "w"), indent=1)
    print(f"\n{'run':<18} {'gain':>6} {'s to +10':>8} {'samples/s':>9} {'tok/sample':>10} {'rejected':>8} {'uniform':>7} {'wasted':>6}")
    for name, r in results.items():
        ten = f"{r['seconds_to_plus_10']:.0f}" if r["seconds_to_plus_10"] is not None else "—"
        tok = f"{r['rollout_tokens_per_trained']:.1f}" if r["rollout_tokens_per_trained"] else "—"
        uni = f"{r['uniform_share']:.2f}" if r.get("uniform_share") is not None else "—"
        print(f"{name:<18} {r['gain_points']:>+6.1f} {ten:>8} {r['trained_per_s']:>9.1f} {tok:>10} {r['rejected']:>8} {uni:>7} {r['wasted_share']:>6.2f}")
    print("\nmean over seeds:")
    for method in args.methods.split(","):
        rs = [r for n, r in results.items() if n.rsplit("-seed", 1)[0] == method]
        if not rs:
            continue
        mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        reached = [r["seconds_to_plus_10"] for r in rs if r["seconds_to_plus_10"] is not None]
        ten = f"{sum(reached) / len(reached):.0f} ({len(reached)}/{len(rs)})" if reached else f"— (0/{len(rs)})"
        print(f"{method:<18} gain {mean('gain_points'):+.1f}  to +10: {ten}  samples/s {mean('trained_per_s'):.1f}  "
              f"tokens/sample {mean('rollout_tokens_per_trained'):.1f}")
    print(f"\nresults: {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
