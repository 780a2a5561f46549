"""Reference for prism's HF export: transformers loads the folder prism wrote.

usage: check_export.py DIR... < request.json
request.json: {"ids": [[...]], "texts": [...]}
prints a JSON list, one entry per DIR: {"logits": nested [B][T][V] float32 logits of `ids`, "texts": token ids
of each text, "decoded": each text's ids decoded back, "class": model class name}
"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

req = json.load(sys.stdin)
results = []
for folder in sys.argv[1:]:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor(req["ids"])).logits.float()
    texts = [tok(t)["input_ids"] for t in req["texts"]]
    results.append({
        "class": type(model).__name__,
        "logits": logits.tolist(),
        "texts": texts,
        "decoded": [tok.decode(ids, skip_special_tokens=False) for ids in texts],
    })
print(json.dumps(results))
