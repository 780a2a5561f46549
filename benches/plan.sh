#!/usr/bin/env bash
# The memory planner (`prism plan`) beside the peak memory of real CPU
# training steps (`--measure`: two steps on random weights, glibc's default
# allocator), for SmolLM2-135M and tiny configs at several shapes, with
# activations kept and recomputed per layer; then the README's table: which
# models fit on 1, 2, 4 and 8 GPUs of 80 GB, with which settings.
#
#   benches/plan.sh            # both (the measurements take a few minutes on 2 cores)
#   benches/plan.sh table      # the table only
set -euo pipefail
cd "$(dirname "$0")/.."
prism=${PRISM:-target/release/prism}
[ -x "$prism" ] || cargo build --release --bin prism
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

config() { # name vocab hidden intermediate heads kv_heads layers
  printf '{"model_type":"llama","vocab_size":%s,"hidden_size":%s,"intermediate_size":%s,"num_attention_heads":%s,"num_key_value_heads":%s,"num_hidden_layers":%s,"max_position_embeddings":8192,"rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":true}' \
    "$2" "$3" "$4" "$5" "$6" "$7" > "$tmp/$1.json"
}

if [ "${1:-}" != table ]; then
  config smollm2-135m 49152 576 1536 9 3 30
  config deep 64 256 768 8 4 8
  config wide 64 512 2048 8 2 4
  config vocab-32k 32768 256 768 8 4 2
  echo "model                 micro-batch x seq (prompt)  activations   measured GB  planned GB  plan - measured"
  for run in "smollm2-135m 8 256 64" "smollm2-135m 4 512 64" "smollm2-135m 2 1024 128" \
             "deep 16 512 128" "wide 16 512 128" "vocab-32k 16 512 128"; do
    set -- $run
    for mode in kept recomputed; do
      flag=(); [ $mode = recomputed ] && flag=(--checkpoint-activations)
      line=$("$prism" plan --model "$tmp/$1.json" --micro-batch "$2" --seq-len "$3" --prompt-len "$4" --measure "${flag[@]}" | grep '^measured:')
      measured=$(sed -E 's/^measured: ([0-9.]+) GB.*/\1/' <<<"$line")
      planned=$(sed -E 's/.*activations ([0-9.]+) GB.*/\1/' <<<"$line")
      pct=$(sed -E 's/.*\(([-+0-9.]+%)\)$/\1/' <<<"$line")
      printf '%-22s%-29s%-14s%12s%12s%17s\n' "$1" "$2 x $3 ($4)" "$mode" "$measured" "$planned" "$pct"
    done
  done
  echo
  # Two in-process ranks, activations recomputed, 16 MB buckets: ZeRO-1
  # holds every gradient; ZeRO-2 streams each layer's out of the backward pass.
  echo "model                 ranks x micro-batch x seq   dist.shard    measured GB  planned GB  plan - measured"
  for shard in optimizer gradients; do
    line=$("$prism" plan --model "$tmp/smollm2-135m.json" --ranks 2 --micro-batch 8 --seq-len 256 --prompt-len 64 \
      --checkpoint-activations --bucket-mb 16 --measure --shard $shard | grep '^measured:')
    measured=$(sed -E 's/^measured: ([0-9.]+) GB.*/\1/' <<<"$line")
    planned=$(sed -E 's/.*activations ([0-9.]+) GB.*/\1/' <<<"$line")
    pct=$(sed -E 's/.*\(([-+0-9.]+%)\)$/\1/' <<<"$line")
    printf '%-22s%-28s%-14s%12s%12s%17s\n' smollm2-135m "2 x 8 x 256 (64)" "$shard" "$measured" "$planned" "$pct"
  done
  echo
fi

# The table: the cheapest setting that fits each model on N x 80 GB (bf16
# autocast, micro-batch 4 x 2048 tokens, 512 of them prompt): float32
# weights first, then bf16 weights with float32 masters (model.dtype); the
# loss over the vocabulary 128 positions at a time (learner.logit_chunk).
echo "| model | parameters | 1 x 80 GB | 2 x 80 GB | 4 x 80 GB | 8 x 80 GB |"
echo "|---|---|---|---|---|---|"
for m in qwen3-0.6b qwen3-1.7b qwen3-4b qwen3-8b qwen3-14b llama-3.1-8b; do
  row="| $m |"
  first=1
  for n in 1 2 4 8; do
    cell="does not fit"
    for dtype in f32 bf16; do
      out=$("$prism" plan --model "configs/models/$m.json" --ranks "$n" --seq-len 2048 --prompt-len 512 --micro-batch 4 --dtype "$dtype" --logit-chunk 128)
      if [ $first = 1 ]; then
        row+=" $(sed -nE 's/.*, ([0-9.]+)M parameters.*/\1/p' <<<"$out" | awk '{printf "%.2fB", $1/1000}') |"
        first=0
      fi
      kept=($(grep '^total, activations kept' <<<"$out" | awk '{print $(NF-2), $(NF-1), $NF}'))
      recomputed=($(grep '^total, recomputed' <<<"$out" | awk '{print $(NF-2), $(NF-1), $NF}'))
      # Cheapest first: no sharding, then sharded optimizer; activations
      # kept, then recomputed; then the gradients sharded too (ZeRO-2 frees
      # them layer by layer only with the layers recomputed).
      for choice in "kept 0 none" "kept 1 optimizer" "recomputed 0 none" "recomputed 1 optimizer" "recomputed 2 gradients"; do
        set -- $choice
        # One rank has nothing to shard with.
        [ "$n" = 1 ] && [ "$2" = 1 ] && continue
        if [ "$1" = kept ]; then gbs=${kept[$2]}; else gbs=${recomputed[$2]}; fi
        if awk -v g="$gbs" 'BEGIN{exit !(g <= 80)}'; then
          cell="$dtype, shard $3, activations $1 ($gbs GB)"
          break 2
        fi
      done
    done
    row+=" $cell |"
  done
  echo "$row"
done
