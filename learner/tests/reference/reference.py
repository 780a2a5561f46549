"""PyTorch reference for the learner's loss and optimizer tests.

Written from the formulas (PPO clip with separate low/high clip, dual clip,
truncated importance weights, KL estimators k1/k2/k3, entropy bonus, the three
aggregations) and from torch's own AdamW and clip_grad_norm_, independently of
the Rust code it checks.

    reference.py loss  INPUTS.safetensors CASES.json OUTPUTS.safetensors
    reference.py adamw INPUTS.safetensors SPEC.json  OUTPUTS.safetensors
    reference.py hf    MODEL.safetensors  (prints the metadata format and tensor names)
"""

import json
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

torch.set_default_dtype(torch.float32)


def kl(logp, ref, estimator):
    if estimator == "k1":
        return logp - ref
    if estimator == "k2":
        return 0.5 * (logp - ref) ** 2
    x = torch.clamp(ref - logp, -20, 20)
    return torch.clamp(torch.exp(x) - x - 1, -10, 10)


def aggregate(values, mask, how, tokens, sequences, norm_len):
    if how == "token_mean":
        return (values * mask).sum() / tokens
    per_row = (values * mask).sum(-1)
    if how == "seq_mean_token_mean":
        return (per_row / mask.sum(-1).clamp(min=1)).sum() / sequences
    return (per_row / norm_len).sum() / sequences


def policy_loss(t, c):
    logits = t["logits"].clone().requires_grad_(True)
    log_probs = torch.log_softmax(logits / c["temperature"], dim=-1)
    logp = log_probs.gather(-1, t["targets"].unsqueeze(-1)).squeeze(-1)
    adv, old, mask = t["advantages"], t["old_logprobs"], t["mask"]
    base = t["prox_logprobs"] if c["is_cap"] > 0 else old
    ratio = torch.exp(torch.clamp(logp - base, -20, 20))
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1 - c["clip_low"], 1 + c["clip_high"])
    pg = torch.maximum(loss1, loss2)
    if c["dual_clip"] > 0:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * c["dual_clip"]), pg)
    if c["is_cap"] > 0:
        weight = torch.exp(torch.clamp(t["prox_logprobs"] - old, -20, 20)).clamp(max=c["is_cap"])
        pg = pg * weight
    per_token = pg
    if c["kl_coef"] > 0:
        per_token = per_token + c["kl_coef"] * kl(logp, t["ref_logprobs"], c["kl_estimator"])
    if c["entropy_coef"] > 0:
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        per_token = per_token - c["entropy_coef"] * entropy
    loss = aggregate(per_token, mask, c["aggregation"], c["norm_tokens"], c["norm_sequences"], c["loss_norm_len"])
    loss.backward()
    return loss.detach(), logits.grad


def run_loss(inputs, cases, outputs):
    t = load_file(inputs)
    out = {}
    for i, c in enumerate(json.load(open(cases))):
        loss, grad = policy_loss(t, c)
        out[f"loss.{i}"] = loss.reshape(1)
        out[f"grad.{i}"] = grad.contiguous()
    save_file(out, outputs)


def run_adamw(inputs, spec_path, outputs):
    t = load_file(inputs)
    spec = json.load(open(spec_path))
    names = spec["names"]
    params = [torch.nn.Parameter(t[f"param.{n}"].clone()) for n in names]
    opt = torch.optim.AdamW(
        params, lr=spec["lrs"][0], betas=(spec["beta1"], spec["beta2"]), eps=spec["eps"],
        weight_decay=spec["weight_decay"], foreach=False,
    )
    norms = []
    for k, lr in enumerate(spec["lrs"]):
        for p, n in zip(params, names):
            p.grad = t[f"grad.{k}.{n}"].clone()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, spec["max_norm"])))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    out = {}
    for p, n in zip(params, names):
        out[f"param.{n}"] = p.detach().clone()
        out[f"exp_avg.{n}"] = opt.state[p]["exp_avg"].clone()
        out[f"exp_avg_sq.{n}"] = opt.state[p]["exp_avg_sq"].clone()
    out["norms"] = torch.tensor(norms, dtype=torch.float64)
    save_file(out, outputs)


def run_hf(model):
    with safe_open(model, framework="pt") as f:
        print(json.dumps({"format": (f.metadata() or {}).get("format"), "names": sorted(f.keys())}))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "loss":
        run_loss(*sys.argv[2:5])
    elif mode == "adamw":
        run_adamw(*sys.argv[2:5])
    elif mode == "hf":
        run_hf(sys.argv[2])
    else:
        sys.exit(f"unknown mode {mode}")
