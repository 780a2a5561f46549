"""The LoRA reference for tests/lora.rs, with PEFT and torch.optim.

step BASE ADAPTER SPEC OUT: loads BASE (an HF folder) with PeftModel and the
adapter in ADAPTER, takes SPEC's AdamW steps (clipped) on the mean
next-token NLL of SPEC's ids, and writes the logits before and after and the
adapter after to OUT (safetensors).

load FOLDER IDS OUT: loads FOLDER (a base with a PEFT adapter beside it) with
AutoModelForCausalLM, which applies the adapter, and writes its logits.
"""
import json
import sys

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

torch.set_num_threads(2)


def nll(model, ids):
    logits = model(input_ids=ids).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    return -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).mean(), logits


def step(base, adapter, spec_path, out_path):
    spec = json.load(open(spec_path))
    ids = torch.tensor(spec["ids"], dtype=torch.long)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], betas=(spec["beta1"], spec["beta2"]), eps=spec["eps"],
                            weight_decay=spec["weight_decay"], foreach=False)
    out = {}
    for k in range(spec["steps"]):
        opt.zero_grad()
        loss, logits = nll(model, ids)
        if k == 0:
            out["logits_before"] = logits.detach().clone()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec["max_norm"])
        opt.step()
    with torch.no_grad():
        out["logits_after"] = model(input_ids=ids).logits.float().clone()
    trainable = sum(p.numel() for p in params)
    for name, t in get_peft_model_state_dict(model).items():
        out[name] = t.detach().clone()
    save_file(out, out_path)
    print(trainable)


def load(folder, ids_json, out_path):
    ids = torch.tensor(json.loads(ids_json), dtype=torch.long)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    save_file({"logits": logits.contiguous()}, out_path)
    print(type(model).__name__, getattr(model, "_hf_peft_config_loaded", False))


if __name__ == "__main__":
    if sys.argv[1] == "step":
        step(*sys.argv[2:6])
    elif sys.argv[1] == "load":
        load(*sys.argv[2:5])
    else:
        sys.exit(f"unknown mode {sys.argv[1]}")
