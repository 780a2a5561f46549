"""transformers' side of `prism bench generate`: the same greedy workload
through `model.generate`, timed the same way.

usage: generate.py MODEL THREADS REPEAT < prompts.json
MODEL: an HF folder or a .gguf file; prompts.json: {"prompts": [[ids]...], "new_tokens": T}
prints JSON {"prefill_s": best time of generate(max_new_tokens=1),
             "total_s": best time of generate(max_new_tokens=T), "torch": version, "threads": n}
"""
import json, os, sys, time
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
source, threads, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
req = json.load(sys.stdin)
device = req.get("device", "cpu")
if source.endswith(".gguf"):
    folder, name = os.path.split(os.path.abspath(source))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
else:
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[req.get("dtype", "f32")]
model = model.to(device=device, dtype=dtype).eval()
ids = torch.tensor(req["prompts"], device=device)
mask = torch.ones_like(ids)
model.generation_config.eos_token_id = None


def run(new_tokens):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return time.perf_counter() - start


run(4)
prefill = min(run(1) for _ in range(repeat))
total = min(run(req["new_tokens"]) for _ in range(repeat))
print(json.dumps({"prefill_s": prefill, "total_s": total, "torch": torch.__version__, "threads": torch.get_num_threads()}))
