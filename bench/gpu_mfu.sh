#!/usr/bin/env bash
# Tokens/s and MFU on one GPU: a Qwen2.5-0.5B-shaped model (random init), block 2048, bf16, SDPA attention,
# through accelerate_configs/single_gpu.yaml and accelerate_configs/zero2.yaml (one process), each with and
# without gradient checkpointing, and with the loss computed in chunks (--loss_chunk_size). About 5 minutes on one
# H100; COMPILE=1 adds torch.compile rows.
#
#   bash bench/gpu_mfu.sh                 # STEPS=30 MICRO_BATCH=8 CHUNK=4096 WORK=/tmp/gpu_mfu by default
#   COMPILE=1 ONLY="single_gpu+compile single_gpu+compile+chunks" MICRO_BATCH=16 bash bench/gpu_mfu.sh
#   PROFILE="single_gpu+chunks" bash bench/gpu_mfu.sh   # also prints that run's costliest ops (steps 6-8)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/gpu_mfu}
STEPS=${STEPS:-30}
MICRO_BATCH=${MICRO_BATCH:-8}
CHUNK=${CHUNK:-4096}
mkdir -p "$WORK"

python3 - "$WORK" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, ".")
import data_utils
work = Path(sys.argv[1])
corpus, tokenizer = data_utils.ensure_demo_assets(work / "demo")
if not (work / "corpus.jsonl").exists():
    data_utils.write_demo_corpus(work / "corpus.jsonl", documents=30000, seed=5)
# Qwen2.5-0.5B's shape (494M parameters with the tied 151,936-token embedding).
config = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=896, intermediate_size=4864,
              num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
              max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
              hidden_act="silu", eos_token_id=0, bos_token_id=0)
(work / "qwen2.5-0.5b-shape").mkdir(exist_ok=True)
(work / "qwen2.5-0.5b-shape" / "config.json").write_text(json.dumps(config))
PY

run() {  # name, accelerate config, extra flags...
  local name=$1 config=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  if [[ " ${PROFILE:-} " == *" $name "* ]]; then set -- "$@" --profile_dir "$WORK/profile_$name"; fi
  # Compiled rows log dynamo's recompiles and graph breaks, counted after the table row (zero2+compile was 25x slow).
  local logs=""; if [[ $name == *compile* ]]; then logs="recompiles,graph_breaks"; fi
  TORCH_LOGS="$logs" accelerate launch --config_file "accelerate_configs/$config" --num_processes 1 train_loop.py \
    --config_name "$WORK/qwen2.5-0.5b-shape" --tokenizer_name "$WORK/demo/tokenizer" \
    --train_files "$WORK/corpus.jsonl" --data_cache_dir "$WORK/cache" --validation_split_percentage 0 \
    --block_size 2048 --bf16 --attn_implementation sdpa --per_device_train_batch_size "$MICRO_BATCH" \
    --max_steps "$STEPS" --logging_steps 10 --save_strategy no --eval_strategy no --report_to none \
    --output_dir "$WORK/out_$name" --overwrite_output_dir "$@" > "$WORK/$name.log" 2>&1 \
    || { echo "$name failed: tail of $WORK/$name.log"; tail -20 "$WORK/$name.log"; return 0; }
  python3 - "$name" "$WORK/out_$name/metrics.jsonl" "$MICRO_BATCH" <<'PY'
import json, sys
last = [json.loads(l) for l in open(sys.argv[2]) if '"loss"' in l][-1]  # steps after the first 2/3: warm
print(f"| {sys.argv[1] + ' mb' + sys.argv[3]:<30} | {last['tokens_per_s']:>10,.0f} | {last['step_time_s']:>7.3f} | "
      f"{100 * last['mfu']:>5.1f}% | {last['peak_mem_gb']:>6.1f} | {last['loss']:.3f} |", flush=True)
PY
  if [ -n "$logs" ]; then
    echo "|   $name: $(grep -c 'Recompiling function' "$WORK/$name.log") recompiles, $(grep -c 'Graph break' \
      "$WORK/$name.log") graph breaks (details in $WORK/$name.log) |"
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "| run                            |   tokens/s |  step s |   MFU | mem GB | loss  |"
echo "|--------------------------------|-----------:|--------:|------:|-------:|-------|"
run single_gpu single_gpu.yaml
run single_gpu+ckpt single_gpu.yaml --gradient_checkpointing
run zero2 zero2.yaml
run zero2+ckpt zero2.yaml --gradient_checkpointing
run single_gpu+chunks single_gpu.yaml --loss_chunk_size "$CHUNK"
run zero2+chunks zero2.yaml --loss_chunk_size "$CHUNK"
if [ "${COMPILE:-0}" = 1 ]; then
  run single_gpu+compile single_gpu.yaml --torch_compile
  run single_gpu+compile+chunks single_gpu.yaml --torch_compile --loss_chunk_size "$CHUNK"
  run zero2+compile zero2.yaml --torch_compile
fi
for name in ${PROFILE:-}; do
  echo; echo "costliest ops of $name (steps 6-8; trace: $WORK/profile_$name/trace_rank0.json)"
  head -n 25 "$WORK/profile_$name/top_ops_rank0.txt" 2>/dev/null || echo "no profile (run $name failed or was skipped)"
done
