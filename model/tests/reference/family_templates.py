"""Renders the model families' chat templates with transformers for
tests/family_templates.rs.

stdin: {"cases": [{"template": str, "bos_token": str | null, "eos_token": str,
                   "messages": [...], "add_generation_prompt": bool, "kwargs": {...}}]}
stdout: a JSON list, per case {"text": str} (apply_chat_template(..., tokenize=False,
chat_template=template, **kwargs) on a tokenizer with that family's bos/eos tokens)
or {"error": str} where the template raised.
"""
import json
import os
import sys
import time

from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

# transformers' strftime_now reads the local clock; prism's reads UTC (the same
# on every host), so the reference runs on UTC too.
os.environ["TZ"] = "UTC"
time.tzset()


def tokenizer(bos, eos):
    vocab = {"<unk>": 0, eos: 1, **({bos: 2} if bos is not None else {})}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # A family whose tokenizer config has no bos_token (Qwen3) passes none.
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, **({"bos_token": bos} if bos is not None else {}))


out = []
for c in json.load(sys.stdin)["cases"]:
    tok = tokenizer(c["bos_token"], c["eos_token"])
    try:
        text = tok.apply_chat_template(c["messages"], chat_template=c["template"], tokenize=False,
                                       add_generation_prompt=c["add_generation_prompt"], **c["kwargs"])
        out.append({"text": text})
    except TemplateError as e:
        out.append({"error": str(e)})
print(json.dumps(out))
