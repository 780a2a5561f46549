"""Process rewards from a judge that behaves like a real one (issue: process
rewards as the mission means them), on the embedded task with TP-GRPO, run on
this machine with the release binary against `prism bench judge-server`
(the realistic judge: grades arithmetic steps with the step checker, flips
verdicts with probability --flip, answers after a log-normal latency of mean
--latency-ms, --concurrency slots, a share --fail of calls failing).

Per seed, after the cached warm start, --rl-seconds of RL in each mode:

  verifier    process rewards from the arithmetic step checker (no judge);
  background  judge process rewards, reward.judge_wait_ms = 0: labels made at
              once by the distilled model (the verifiers until it agrees with
              the judge), the judge annotating in the background;
  blocking    judge process rewards, reward.judge_wait_ms = 120000: every
              admitted group waits for the judge's verdicts;
  outage      background, with the judge server stopped for --outage-seconds
              from the middle of the run (connections refused), then started.

    python3 benches/process_rewards.py [--seeds 0,1,2] [--rl-seconds 300] \
        [--modes verifier,background,blocking,outage] [--out DIR]

Prints one table (trained samples/s, held-out gain, distiller agreement over
time, judge share) and writes everything to DIR/results.json. A run whose log
in DIR shows it finished is reused.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# PRISM_BIN runs another build (a copy, so that rebuilding during a long
# benchmark does not change the binary under it).
PRISM = os.environ.get("PRISM_BIN") or os.path.join(ROOT, "target", "release", "prism")


def finished_folder(log):
    if not os.path.exists(log):
        return None
    m = re.search(r"run folder: (.*)", open(log).read())
    folder = m and m.group(1).strip()
    return folder if folder and os.path.exists(os.path.join(folder, "summary.json")) else None


def add_judge_args(p):
    """The realistic judge's settings, for the benchmarks that start one."""
    p.add_argument("--latency-ms", type=float, default=1500)
    p.add_argument("--flip", type=float, default=0.15)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--fail", type=float, default=0.02)


class JudgeServer:
    """`prism bench judge-server` in the background; SIGUSR1 toggles an outage."""

    def __init__(self, args, seed, log):
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [PRISM, "bench", "judge-server", "--listen", "127.0.0.1:0",
             "--latency-ms", str(args.latency_ms), "--flip", str(args.flip),
             "--concurrency", str(args.concurrency), "--fail", str(args.fail), "--seed", str(seed)],
            stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            sys.exit(f"judge-server did not start (printed {self.url!r}); see {log}")

    def toggle_outage(self):
        self.proc.send_signal(signal.SIGUSR1)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        out = self.proc.stdout.read()
        self.proc.wait(timeout=30)
        lines = [l for l in out.splitlines() if l.strip().startswith("{")]
        return json.loads(lines[-1]) if lines else None


def train(out, name, sets, during=None):
    args = [PRISM, "train", "--set", f"run.dir={os.path.join(out, 'runs')}"]
    for s in sets:
        args += ["--set", s]
    log = os.path.join(out, f"{name}.log")
    folder = finished_folder(log)
    if folder:
        print(f"{name}: reusing {folder}", flush=True)
    else:
        print(f"{name}: running", flush=True)
        with open(log, "w") as f:
            proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
            if during:
                threading.Thread(target=during, args=(log,), daemon=True).start()
            code = proc.wait()
        text = open(log).read()
        if code != 0:
            sys.exit(f"{name}: prism train failed ({code}); see {log}:\n{text[-2000:]}")
        folder = re.search(r"run folder: (.*)", text).group(1).strip()
    summary = json.load(open(os.path.join(folder, "summary.json")))
    rows = [json.loads(l) for l in open(os.path.join(folder, "metrics.jsonl")) if l.strip()]
    return folder, summary, rows, open(log).read()


def measure(summary, rows):
    steps = [r for r in rows if r.get("kind") == "step"]
    trained = summary["ledger"]["trained"]
    sources = {}
    for r in steps:
        for k, v in (r.get("reward_sources") or {}).items():
            sources[k] = sources.get(k, 0) + v
    scored = sum(sources.values()) or 1
    agreement = [(round(r["time_s"]), r["distill_agreement"]) for r in steps if r.get("distill_agreement") is not None]
    last = steps[-1] if steps else {}
    return {
        "steps": len(steps),
        "trained": trained,
        "trained_per_s": trained / summary["rl_wall_s"],
        "start_accuracy": summary["start_accuracy"],
        "final_accuracy": summary["final_accuracy"],
        "gain_points": 100 * (summary["final_accuracy"] - summary["start_accuracy"]),
        "balanced": summary["balanced"],
        "ledger": summary["ledger"],
        "source_shares": {k: v / scored for k, v in sorted(sources.items())},
        "agreement_over_time": agreement[:: max(1, len(agreement) // 8)] + agreement[-1:],
        "annotation_queue": last.get("annotation_queue"),
        "judge_latency_ms": last.get("judge_latency_ms"),
        "canary_fp_rate": last.get("canary_fp_rate"),
        "judge_budget_refused": last.get("judge_budget_refused"),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rl-seconds", type=float, default=300)
    p.add_argument("--modes", default="verifier,background,blocking,outage")
    add_judge_args(p)
    p.add_argument("--outage-seconds", type=float, default=60)
    p.add_argument("--template", default="thinkprm")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-process-rewards"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not os.path.exists(PRISM):
        sys.exit("build first: cargo build --release")
    results = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        base = [f"run.seed={seed}", f"train.time_limit_s={args.rl_seconds}", "learner.advantage=tp_grpo"]
        for mode in args.modes.split(","):
            name = f"{mode}-seed{seed}"
            if mode == "verifier":
                results[name] = measure(*train(args.out, name, base + ["reward.process=verifier"])[1:3])
                continue
            judge = JudgeServer(args, seed, os.path.join(args.out, f"{name}.judge.log"))
            wait = 0 if mode in ("background", "outage") else 120000
            sets = base + [
                "reward.process=judge", "reward.fallback=distilled", f"reward.judge_wait_ms={wait}",
                "distill.enabled=true", f"judge.url={judge.url}", f"judge.template={args.template}",
                f"judge.concurrency={args.concurrency}",
            ]
            during = None
            if mode == "outage":
                def during(log, judge=judge):
                    # The outage starts at the middle of RL: after the warm start.
                    while "warm start:" not in open(log).read():
                        time.sleep(0.5)
                    time.sleep(args.rl_seconds / 2 - args.outage_seconds / 2)
                    judge.toggle_outage()
                    time.sleep(args.outage_seconds)
                    judge.toggle_outage()
            folder, summary, rows, text = train(args.out, name, sets, during)
            stats = judge.stop()
            r = measure(summary, rows)
            r["judge_server"] = stats
            r["console_judge_lines"] = [l for l in text.splitlines() if "judge" in l.lower() and ("WARN" in l or "INFO" in l)][:12]
            results[name] = r
        json.dump(results, open(os.path.join(args.out, "results.json"), "w"), indent=1)
    print(f"\n{'run':<22} {'steps':>5} {'samples/s':>9} {'start':>6} {'final':>6} {'gain':>6}  sources")
    for name, r in results.items():
        shares = " ".join(f"{k} {v:.0%}" for k, v in r["source_shares"].items())
        print(f"{name:<22} {r['steps']:>5} {r['trained_per_s']:>9.1f} {r['start_accuracy']:>6.1%} "
              f"{r['final_accuracy']:>6.1%} {r['gain_points']:>+6.1f}  {shares}")
        if r.get("agreement_over_time"):
            print(f"{'':<22} distiller agreement (s, share): {r['agreement_over_time']}")
        if r.get("console_judge_lines"):
            for l in r["console_judge_lines"]:
                print(f"{'':<22} console: {l[:140]}")
    print(f"\nresults: {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
