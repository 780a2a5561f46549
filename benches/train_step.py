"""The PyTorch eager half of `prism bench train`: the learner's train step
(forward, GRPO clipped loss with token-mean aggregation, entropy for the report,
backward, global-norm clipping, AdamW) on the same shapes, model and thread
count as the Rust run, timed the same way (median of the timed steps).

    train_step.py run --model PATH [--gguf FILE] --batch B --seq-len L --prompt-len P
                      --micro-batch M --steps N --warmup W --threads T --device cpu|cuda [--bf16]
    train_step.py random-model DIR --shape qwen2-0.5b|tiny-llama   (writes an HF folder with random weights)

Prints one JSON object: tokens_per_s, step_seconds, device_name, params.
"""

import argparse
import json
import math
import time

import torch


def load(args):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    if args.gguf:
        kwargs["gguf_file"] = args.gguf
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    return model.to(args.device).train()


def run(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = load(args)
    vocab = model.config.vocab_size
    b, length, p = args.batch, args.seq_len, args.prompt_len
    ids = torch.randint(0, vocab, (b, length), device=device)
    attn = torch.ones_like(ids)
    targets = ids[:, p:]
    old = torch.full(targets.shape, -math.log(vocab), device=device)
    adv = torch.tensor([1.0 if i % 2 else -1.0 for i in range(b)], device=device)[:, None].expand_as(old)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    clip_low, clip_high, dual = 0.2, 0.28, 3.0
    tokens = targets.numel()

    def step():
        opt.zero_grad(set_to_none=True)
        entropy_sum = 0.0
        for s in range(0, b, args.micro_batch):
            sl = slice(s, s + args.micro_batch)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(input_ids=ids[sl], attention_mask=attn[sl]).logits
            window = logits[:, p - 1 : length - 1].float()
            log_probs = torch.log_softmax(window, dim=-1)
            logp = log_probs.gather(-1, targets[sl].unsqueeze(-1)).squeeze(-1)
            ratio = torch.exp(torch.clamp(logp - old[sl], -20, 20))
            a = adv[sl]
            pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
            pg = torch.where(a < 0, torch.minimum(pg, -a * dual), pg)
            loss = pg.sum() / tokens
            with torch.no_grad():
                entropy_sum += float(-(log_probs.exp() * log_probs).sum())
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(norm), entropy_sum

    seconds = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
    median = sorted(seconds)[len(seconds) // 2]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({
        "tokens_per_s": b * length / median,
        "step_seconds": seconds,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "params": sum(q.numel() for q in params),
        "torch": torch.__version__,
    }))


def random_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    shapes = {
        # Qwen2-0.5B's shape (config of Qwen/Qwen2-0.5B).
        "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                           max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                           tie_word_embeddings=True),
        "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                           max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True),
    }
    shape = dict(shapes[args.shape])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(args.dir)
    print(json.dumps({"dir": args.dir, "params": sum(q.numel() for q in model.parameters())}))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--gguf")
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--seq-len", type=int, default=256)
    r.add_argument("--prompt-len", type=int, default=64)
    r.add_argument("--micro-batch", type=int, default=8)
    r.add_argument("--steps", type=int, default=3)
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument("--threads", type=int, default=torch.get_num_threads())
    r.add_argument("--device", default="cpu")
    r.add_argument("--bf16", action="store_true")
    r.add_argument("--lr", type=float, default=1e-6)
    r.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("random-model")
    m.add_argument("dir")
    m.add_argument("--shape", default="qwen2-0.5b")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        random_model(args)


if __name__ == "__main__":
    main()
