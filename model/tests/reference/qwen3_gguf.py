"""Writes a tiny Qwen3 HF folder (made by tiny_hf.py) as a GGUF file the way
llama.cpp lays out the qwen3 architecture: its metadata keys, `blk.N.*`
tensor names (q/k norms as `attn_q_norm` / `attn_k_norm`, no q/k row
permutation) and float32 data, with a byte-level BPE tokenizer of single
characters (the weights, not the tokenizer, are what is compared).

usage: qwen3_gguf.py HF_DIR OUT.gguf
"""
import json, os, sys
import numpy as np
import gguf
from safetensors.numpy import load_file

src, out = sys.argv[1], sys.argv[2]
cfg = json.load(open(os.path.join(src, "config.json")))
tensors = load_file(os.path.join(src, "model.safetensors"))
rope = cfg.get("rope_parameters") or {}

w = gguf.GGUFWriter(out, "qwen3")
w.add_block_count(cfg["num_hidden_layers"])
w.add_context_length(cfg["max_position_embeddings"])
w.add_embedding_length(cfg["hidden_size"])
w.add_feed_forward_length(cfg["intermediate_size"])
w.add_head_count(cfg["num_attention_heads"])
w.add_head_count_kv(cfg["num_key_value_heads"])
w.add_key_length(cfg["head_dim"])
w.add_value_length(cfg["head_dim"])
w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
vocab = cfg["vocab_size"]
w.add_tokenizer_model("gpt2")
w.add_token_list([chr(ord("A") + i) for i in range(vocab)])
w.add_token_types([1] * vocab)
w.add_token_merges([])
w.add_bos_token_id(1)
w.add_eos_token_id(2)

fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
modules = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
for name, t in sorted(tensors.items()):
    if name in fixed:
        g = fixed[name]
    else:
        rest = name[len("model.layers."):]
        layer, rest = rest.split(".", 1)
        module, param = rest.rsplit(".", 1)
        g = f"blk.{layer}.{modules[module]}.{param}"
    w.add_tensor(g, np.ascontiguousarray(t.astype(np.float32)))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print("ok")
