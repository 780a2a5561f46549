"""prism against TRL's GRPOTrainer on the same GRPO workload (issue 19's peer
benchmark), alternating them in one command, and the step-time ratio.

    .venv/bin/python benches/trl_twin.py [--steps 12] [--skip 2] [--rounds 2] [--threads 2]

The workload: SmolLM2-135M-Instruct (the GGUF scripts/setup fetches, exported
by prism to one float32 HF folder that both load), on the CPU with 2 threads; per step one prompt
"Compute a+b*c. Reply with just the number." (a, b, c drawn from 1-20 with a
fixed seed) and 8 sampled completions of at most 64 tokens at temperature 1;
reward 1 when the right integer appears in the completion; GRPO, no KL
(beta = 0), lr 1e-6, float32, no gradient checkpointing; synchronous (the
next step samples from the updated weights). prism runs configs/trl-twin.toml
(every group trained, as TRL trains uniform groups too).

TRL is not part of the pinned environment: the first run installs
trl==1.16.0 (and datasets) into .venv with the pinned packages held as
constraints, so torch and transformers stay what prism is tested against.

Printed: each run's median step time over the steps after --skip, its
generation (TRL: generating and scoring; prism: the rollout worker's busy
time) and update (the rest; prism: the learner's train time) parts, and the
ratio TRL / prism of the medians over all rounds.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GGUF = REPO / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
TRL = "trl==1.16.0"
DATASETS = "datasets==4.7.0"
PINNED = ["torch", "transformers", "safetensors", "numpy", "accelerate", "peft", "gguf"]


def ensure_trl():
    try:
        import trl  # noqa: F401
        return
    except ImportError:
        pass
    from importlib.metadata import version
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        for name in PINNED:
            f.write(f"{name}=={version(name)}\n")
        constraints = f.name
    print(f"trl_twin: installing {TRL} and {DATASETS} into {sys.prefix} (pinned packages held)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "-c", constraints, TRL, DATASETS], check=True)


def problems(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = (rng.randint(1, 20) for _ in range(3))
        out.append({"question": f"Compute {a}+{b}*{c}. Reply with just the number.", "answer": str(a + b * c)})
    return out


def run_trl(args, out_path):
    """One TRL run in a child process (its own threads and memory)."""
    cmd = [sys.executable, __file__, "_trl", "--model", str(args.model), "--steps", str(args.steps), "--threads", str(args.threads),
           "--seed", str(args.seed), "--out", str(out_path)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    subprocess.run(cmd, check=True, env=env)
    return json.loads(Path(out_path).read_text())


def trl_child(args):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import re

    torch.set_num_threads(args.threads)
    rows = problems(args.steps * 8, args.seed)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]} for r in rows])
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    def right_integer(completions, answer, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if a in re.findall(r"-?\d+", t) else 0.0 for t, a in zip(texts, answer)]

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-twin-"), per_device_train_batch_size=8, num_generations=8,
        max_completion_length=64, beta=0.0, learning_rate=1e-6, lr_scheduler_type="constant",
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, max_steps=args.steps,
        temperature=1.0, logging_steps=1, report_to=[], save_strategy="no", seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[right_integer], args=config, train_dataset=data, processing_class=tok)

    steps, generation = [], []
    generate = trainer._generate_and_score_completions

    def timed_generate(*a, **k):
        start = time.perf_counter()
        out = generate(*a, **k)
        generation.append(time.perf_counter() - start)
        return out

    trainer._generate_and_score_completions = timed_generate

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            steps.append(time.perf_counter() - self.start)

    trainer.add_callback(Clock())
    trainer.train()
    import trl
    Path(args.out).write_text(json.dumps({"step_s": steps, "generate_s": generation, "trl": trl.__version__}))


def run_prism(args, data_path, work):
    run_dir = work / "prism-runs"
    cmd = [str(REPO / "target/release/prism"), "train", "--config", str(REPO / "configs/trl-twin.toml"),
           "--set", f"model.source={args.model}", "--set", f"task.jsonl.train={data_path}", "--set", f"run.dir={run_dir}", "--set", f"train.steps={args.steps}",
           "--set", f"train.threads={args.threads}", "--set", f"run.seed={args.seed}"]
    for kv in args.prism_set:
        cmd += ["--set", kv]
    before = set(run_dir.glob("*")) if run_dir.exists() else set()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    (run,) = set(run_dir.glob("*")) - before - {run_dir / "cache"}
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind") == "step"]
    times = [r["time_s"] for r in rows]
    step_s = [b - a for a, b in zip([0.0] + times, times)]
    # rollout_busy_s is the rollout worker's busy time so far.
    busy = [r["rollout_busy_s"] for r in rows]
    generate_s = [b - a for a, b in zip([0.0] + busy, busy)]
    return {"step_s": step_s, "generate_s": generate_s, "train_s": [r["train_s"] for r in rows]}


def median_after(xs, skip):
    xs = xs[skip:]
    return statistics.median(xs) if xs else float("nan")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", nargs="?", default="bench")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the medians (warm-up)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    p.add_argument("--prism-set", action="append", default=[], metavar="KEY=VALUE", help="an override for prism's runs (repeatable)")
    p.add_argument("--sides", default="prism,trl", help="which to run (comma-separated)")
    p.add_argument("--model", help="(internal) the HF folder both sides load")
    args = p.parse_args()
    if args.mode == "_trl":
        return trl_child(args)
    if not GGUF.exists():
        sys.exit(f"trl_twin: {GGUF} is missing: run scripts/setup")
    if not (REPO / "target/release/prism").exists():
        sys.exit("trl_twin: target/release/prism is missing: cargo build --release")
    ensure_trl()
    work = Path(tempfile.mkdtemp(prefix="trl-twin-"))
    # One float32 HF folder for both (transformers refuses to train a model
    # it loaded from GGUF, which it counts as quantized).
    args.model = work / "smollm2-135m-instruct"
    subprocess.run([str(REPO / "target/release/prism"), "export", "--from", str(GGUF), "--to", str(args.model)],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in problems(args.steps * 8, args.seed)))
    results = {"prism": [], "trl": []}
    for r in range(args.rounds):
        for side in [s for s in ("prism", "trl") if s in args.sides.split(",")]:
            out = run_prism(args, data, work) if side == "prism" else run_trl(args, work / f"trl-{r}.json")
            step = median_after(out["step_s"], args.skip)
            gen = median_after(out["generate_s"], args.skip)
            upd = median_after(out["train_s"], args.skip) if side == "prism" else step - gen
            results[side].append((step, gen, upd))
            print(f"round {r + 1} {side:<6} step {step:7.2f} s   generation {gen:6.2f} s   update {upd:6.2f} s", flush=True)
    med = {s: [statistics.median(x[i] for x in v) for i in range(3)] for s, v in results.items() if v}
    print(f"\nmedians over {args.rounds} rounds, {args.steps} steps each ({args.skip} left out), {args.threads} threads:")
    for s in med:
        print(f"  {s:<6} step {med[s][0]:7.2f} s   generation {med[s][1]:6.2f} s   update {med[s][2]:6.2f} s")
    if len(med) < 2:
        return
    print(f"  TRL / prism step time: {med['trl'][0] / med['prism'][0]:.2f}x "
          f"(generation {med['trl'][1] / med['prism'][1]:.2f}x, update {med['trl'][2] / med['prism'][2]:.2f}x)")


if __name__ == "__main__":
    main()
