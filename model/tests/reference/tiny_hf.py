"""Reference for prism's transformer: tiny random Llama (linear and Llama 3.1
RoPE scaling), Mistral (sliding window), Qwen2, Qwen3, Gemma 2 and Gemma 3
checkpoints saved by transformers, and their float32 logits.

usage: tiny_hf.py OUT_DIR
writes OUT_DIR/{llama,llama3,mistral,qwen2,qwen3,gemma2,gemma3}/ (HF folders; qwen2 sharded) and
OUT_DIR/reference.safetensors with `ids`, `mask`, `positions` and, per model,
`<name>.logits` (no mask), `<name>.logits_masked` (left-padded second row) and
`<name>.greedy` (32 greedy tokens after the first row, no eos).
"""
import sys, os
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3TextConfig, Gemma3ForCausalLM

out = sys.argv[1]
torch.manual_seed(0)
common = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
models = {
    "llama": LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False,
                                          rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "qwen2": Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Llama 3.1's scaling, with an original context short enough that the
    # head's frequencies fall in all three bands (kept, blended, slowed).
    "llama3": LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True,
                                           rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                                            "rope_theta": 500000.0})),
    # Mistral with a window shorter than the inputs (12 tokens, 44 generated).
    "mistral": MistralForCausalLM(MistralConfig(**common, sliding_window=5, tie_word_embeddings=False,
                                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Qwen3: q/k norms per head and a head dimension that is not hidden / heads.
    "qwen3": Qwen3ForCausalLM(Qwen3Config(**common, head_dim=24, tie_word_embeddings=False,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Gemma 2: alternating sliding (5 positions) and full layers, a query
    # scale of its own, and soft caps small enough to bend these scores and
    # logits (Gemma 2's own, 50 and 30, leave a random tiny model's linear).
    "gemma2": Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
                                             attn_logit_softcapping=0.1, final_logit_softcapping=0.5,
                                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Gemma 3: q/k norms, a sliding layer with its own RoPE base and a full
    # layer with linear scaling, as Gemma 3 4B and up have.
    "gemma3": Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
                                                 layer_types=["sliding_attention", "full_attention"],
                                                 rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                                                                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
}
ids = torch.randint(0, 64, (2, 12))
mask = torch.ones(2, 12, dtype=torch.long)
mask[1, :4] = 0
positions = (mask.cumsum(-1) - 1).clamp(min=0)
tensors = {"ids": ids, "mask": mask, "positions": positions}
for name, model in models.items():
    # Random norms and biases too, so that a weight read from the wrong place shows.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    shard = "20KB" if name == "qwen2" else "50GB"
    model.save_pretrained(os.path.join(out, name), max_shard_size=shard)
    with torch.no_grad():
        tensors[f"{name}.logits"] = model(ids).logits.float().contiguous()
        tensors[f"{name}.logits_masked"] = model(ids, attention_mask=mask, position_ids=positions).logits.float().contiguous()
        out_ids = model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        tensors[f"{name}.greedy"] = out_ids[0, ids.shape[1]:].contiguous()
save_file(tensors, os.path.join(out, "reference.safetensors"))
print("ok")
