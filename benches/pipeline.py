"""The embedded default's learning benchmarks (issue: the actor system and the
main job), run on this machine with the release binary:

  1. per seed: the warm start's held-out accuracy, and after 5 minutes of RL
     (TP-GRPO, the default), with the lowest evaluation on the way (collapse);
  2. per seed: the same 5 minutes spent on more supervised training on the same
     flawed demonstrations (the warm start run for longer), held-out accuracy;
  3. per seed: outcome-only GRPO for the same 5 minutes: RL steps and wall time
     to reach +10 points over the warm start, against TP-GRPO's;
  4. seed 0: asynchronous (learner.max_staleness = 2) against synchronous (0):
     trained samples per second and where the time went per stage.

    python3 benches/pipeline.py [--seeds 0,1,2] [--rl-seconds 300] [--out DIR]

Prints one table per part and writes everything to DIR/results.json. A run
whose log in DIR shows it finished is reused, so an interrupted benchmark
continues where it stopped.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRISM = os.path.join(ROOT, "target", "release", "prism")


def finished_folder(log):
    """The run folder of a finished run logged in `log`, if any."""
    if not os.path.exists(log):
        return None
    m = re.search(r"run folder: (.*)", open(log).read())
    folder = m and m.group(1).strip()
    return folder if folder and os.path.exists(os.path.join(folder, "summary.json")) else None


def run(out, name, sets):
    runs = os.path.join(out, "runs")
    args = [PRISM, "train", "--set", f"run.dir={runs}"]
    for s in sets:
        args += ["--set", s]
    log = os.path.join(out, f"{name}.log")
    started = time.time()
    folder = finished_folder(log)
    if folder:
        print(f"{name}: reusing {folder}", flush=True)
    else:
        with open(log, "w") as f:
            code = subprocess.call(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        text = open(log).read()
        if code != 0:
            sys.exit(f"{name}: prism train failed ({code}); see {log}:\n{text[-2000:]}")
        folder = re.search(r"run folder: (.*)", text).group(1).strip()
    summary = json.load(open(os.path.join(folder, "summary.json")))
    metrics = [json.loads(l) for l in open(os.path.join(folder, "metrics.jsonl")) if l.strip()]
    trace = os.path.join(folder, "trace.jsonl")
    warm_s = warm_steps = None
    for line in open(trace):
        if "warm start trained" in line:
            fields = json.loads(line)["fields"]
            warm_s, warm_steps = fields.get("seconds"), fields.get("steps")
    return {"name": name, "folder": folder, "summary": summary, "metrics": metrics, "warm_s": warm_s, "warm_steps": warm_steps,
            "wall_s": time.time() - started}


def default_setting(section, key):
    """`section.key` of the embedded default (an integer), from `prism train --print-config`."""
    text = subprocess.run([PRISM, "train", "--print-config"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    body = text.split(f"[{section}]\n", 1)[1].split("\n[", 1)[0]
    return int(re.search(rf"^{key}\s*=\s*(\d+)", body, re.M).group(1))


def evals(r):
    return [(m["step"], m["time_s"], m["eval_accuracy"]) for m in r["metrics"] if m.get("kind") == "eval"]


def to_plus(r, points):
    start = r["summary"]["start_accuracy"]
    for step, t, acc in evals(r):
        if acc >= start + points / 100:
            return step, t
    return None, None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rl-seconds", type=float, default=300)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-pipeline"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    limit = f"train.time_limit_s={args.rl_seconds}"
    results = {"seeds": seeds, "rl_seconds": args.rl_seconds, "tp_grpo": {}, "grpo": {}, "sft": {}, "async": None}

    base_steps = default_setting("warmstart", "steps")
    for seed in seeds:
        tp = run(args.out, f"tp_grpo-seed{seed}", [f"run.seed={seed}", limit])
        gr = run(args.out, f"grpo-seed{seed}", [f"run.seed={seed}", limit, "learner.advantage=grpo"])
        # More imitation for the same wall time: the warm start's own pace
        # (seconds per SFT step, measured where it was trained) sets the extra
        # steps; the longer warm start continues from the cached one.
        per_step = tp["warm_s"] / tp["warm_steps"] if tp["warm_s"] and tp["warm_steps"] else None
        extra = int(args.rl_seconds / per_step) if per_step else 1500
        sft = run(args.out, f"sft-seed{seed}", [f"run.seed={seed}", f"warmstart.steps={base_steps + extra}", "train.steps=1"])
        results["tp_grpo"][seed] = tp
        results["grpo"][seed] = gr
        results["sft"][seed] = dict(sft, extra_steps=extra, seconds_per_step=per_step)

    # The default run of the first seed is one side of the comparison.
    default = results["tp_grpo"][seeds[0]]
    if default_setting("learner", "max_staleness") == 2:
        sync, asyn = run(args.out, f"sync-seed{seeds[0]}", [f"run.seed={seeds[0]}", limit, "learner.max_staleness=0"]), default
    else:
        sync, asyn = default, run(args.out, f"async-seed{seeds[0]}", [f"run.seed={seeds[0]}", limit, "learner.max_staleness=2"])
    results["async"] = asyn
    results["sync"] = sync

    print(f"\n1-2. held-out accuracy (200 problems, greedy), {args.rl_seconds:.0f} s of RL vs the same time of more SFT")
    print(f"{'seed':>4} {'warm start':>11} {'RL final':>9} {'gain':>7} {'RL min eval':>12} {'more SFT':>9} {'SFT extra steps':>16}")
    for seed in seeds:
        tp, sft = results["tp_grpo"][seed], results["sft"][seed]
        start, final = tp["summary"]["start_accuracy"], tp["summary"]["final_accuracy"]
        low = min(a for _, _, a in evals(tp))
        print(f"{seed:>4} {start:>11.1%} {final:>9.1%} {100 * (final - start):>+6.1f}p {low:>12.1%} "
              f"{sft['summary']['start_accuracy']:>9.1%} {sft['extra_steps']:>16}")

    print("\n3. RL steps and wall time to +10 points over the warm start")
    print(f"{'seed':>4} {'TP-GRPO steps':>14} {'TP-GRPO s':>10} {'GRPO steps':>11} {'GRPO s':>8} {'TP final':>9} {'GRPO final':>11}")
    for seed in seeds:
        tp, gr = results["tp_grpo"][seed], results["grpo"][seed]
        (ts, tt), (gs, gt) = to_plus(tp, 10), to_plus(gr, 10)
        fmt = lambda v, f: "never" if v is None else f.format(v)
        print(f"{seed:>4} {fmt(ts, '{}'):>14} {fmt(tt, '{:.0f}'):>10} {fmt(gs, '{}'):>11} {fmt(gt, '{:.0f}'):>8} "
              f"{tp['summary']['final_accuracy']:>9.1%} {gr['summary']['final_accuracy']:>11.1%}")

    print("\n4. asynchronous (max_staleness 2) vs synchronous (0), seed", seeds[0])
    print(f"{'':>6} {'trained/s':>10} {'steps':>6} {'rollout busy s':>15} {'reward busy s':>14} {'train s':>8} {'wait s':>7} {'lag mean':>9}")
    for label, r in [("sync", sync), ("async", asyn)]:
        steps = [m for m in r["metrics"] if m.get("kind") == "step"]
        last = steps[-1]
        trained_per_s = r["summary"]["ledger"]["trained"] / r["summary"]["rl_wall_s"]
        lag = sum(m["lag_mean"] for m in steps) / len(steps)
        print(f"{label:>6} {trained_per_s:>10.1f} {len(steps):>6} {last['rollout_busy_s']:>15.1f} {last['reward_busy_s']:>14.1f} "
              f"{sum(m['train_s'] for m in steps):>8.1f} {sum(m['wait_s'] for m in steps):>7.1f} {lag:>9.2f}")

    for group in ("tp_grpo", "grpo", "sft"):
        for r in results[group].values():
            r.pop("metrics", None)
    for r in (results["async"], results["sync"]):
        r.pop("metrics", None)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"\nwrote {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
