"""Reference for prism on SmolLM2-135M-Instruct: transformers loading the same
GGUF file (dequantized to float32).

usage: smollm.py GGUF OUT_DIR < cases.json
cases.json: {"texts": [...], "conversations": [[{"role", "content"}...]...],
             "logits_text": str, "greedy_prompt": [{"role", "content"}...], "new_tokens": int}
writes OUT_DIR/reference.json (token ids of each text, each conversation rendered
with and without the generation prompt, the 64 logits-prompt ids, the greedy
prompt ids and its continuation) and OUT_DIR/logits.safetensors (`logits` [64, V]).
"""
import json, os, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
gguf, out = sys.argv[1], sys.argv[2]
cases = json.load(sys.stdin)
folder, name = os.path.split(os.path.abspath(gguf))
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()

result = {"texts": [tok(t, add_special_tokens=True)["input_ids"] for t in cases["texts"]]}
result["chats"] = [
    [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=g) for g in (False, True)]
    for c in cases["conversations"]
]
ids = tok(cases["logits_text"])["input_ids"][:64]
assert len(ids) == 64, len(ids)
result["logits_ids"] = ids
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].float().contiguous()
save_file({"logits": logits}, os.path.join(out, "logits.safetensors"))

prompt = tok.apply_chat_template(cases["greedy_prompt"], tokenize=False, add_generation_prompt=True)
prompt_ids = tok(prompt)["input_ids"]
model.generation_config.eos_token_id = None
with torch.no_grad():
    gen = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=cases["new_tokens"], do_sample=False, eos_token_id=None, pad_token_id=2)
result["greedy_prompt_ids"] = prompt_ids
result["greedy"] = gen[0, len(prompt_ids):].tolist()
result["greedy_text"] = tok.decode(result["greedy"], skip_special_tokens=True)
with open(os.path.join(out, "reference.json"), "w") as f:
    json.dump(result, f)
print("ok")
