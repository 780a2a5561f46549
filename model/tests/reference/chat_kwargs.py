"""Renders chat templates with transformers for tests/chat_kwargs.rs.

stdin: {"dir": tokenizer folder, "template": str, "cases": [{"messages", "add_generation_prompt", "kwargs"}]}
stdout: a JSON list of the rendered strings (apply_chat_template(..., tokenize=False, **kwargs)).
"""
import json
import sys

from transformers import AutoTokenizer

spec = json.load(sys.stdin)
tok = AutoTokenizer.from_pretrained(spec["dir"])
out = [
    tok.apply_chat_template(c["messages"], chat_template=spec["template"], tokenize=False,
                            add_generation_prompt=c["add_generation_prompt"], **c["kwargs"])
    for c in spec["cases"]
]
print(json.dumps(out))
