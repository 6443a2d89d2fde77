#!/usr/bin/env bash
# Tokens/s and MFU on one GPU, in one run (about 8 minutes on one H100; GPU time is scarce, so few steps):
#  - Qwen2.5-0.5B's shape, block 2048, bf16, micro-batch 16: single_gpu and zero2, each compiled (regional
#    torch.compile of the decoder layers): the zero2/single_gpu ratio and the best single-GPU MFU.
#  - Qwen2.5-1.5B's shape (the chapter's model) with the chapter's settings (block 2048, bf16, gradient
#    checkpointing, micro-batch 16) through zero2.yaml with one process: eager, compiled, Liger-Kernel, compiled +
#    Liger, compiled + FP8 (--fp8, torchao), compiled with attention within documents (--attn_mask_type
#    block_causal: sdpa's dense mask, flash-attention's varlen), and single_gpu with compiled + Liger; beside them
#    transformers.Trainer with the chapter's DeepSpeed JSON (bench/trainer_chapter.py) on the same blocks: tokens/s,
#    MFU, peak memory and loss after the same steps.
# Random init and the demo corpus: the data is not what is measured. Compiled rows print the graphs dynamo made.
# Without a CUDA GPU it dry-runs every row with tiny shapes in fp32 (a check of the script, not a measurement; the
# FP8 rows are then refused in one line, as they should be).
#
#   pip install -r requirements-gpu.txt && bash bench/gpu_mfu.sh     # STEPS=12 MICRO_BATCH=16 WORK=/tmp/gpu_mfu
#   ONLY="1.5b:zero2 1.5b:trainer" bash bench/gpu_mfu.sh              # some rows; PROFILE="<row>" adds its top ops
#   FULL=1 bash bench/gpu_mfu.sh                                       # also eager and Liger-only rows, and ckpt=off
#   ONLY="1.5b:loss-bf16 1.5b:loss-fp8" LOSS_STEPS=200 bash bench/gpu_mfu.sh   # FP8's loss against bf16's
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/gpu_mfu}
if python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then DRY=0; else DRY=1; fi
STEPS=${STEPS:-$([ $DRY = 1 ] && echo 3 || echo 12)}
MICRO_BATCH=${MICRO_BATCH:-$([ $DRY = 1 ] && echo 2 || echo 16)}
BLOCK=$([ $DRY = 1 ] && echo 128 || echo 2048)
PRECISION=$([ $DRY = 1 ] && echo "" || echo "--bf16")  # bf16 on a CPU without native support is ~100x slower
LOSS_STEPS=${LOSS_STEPS:-200}
mkdir -p "$WORK"

python3 - "$WORK" "$DRY" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, ".")
from pretrain import demo_corpus
work, dry = Path(sys.argv[1]), sys.argv[2] == "1"
corpus, tokenizer = demo_corpus.ensure_demo_assets(work / "demo")
if not (work / "corpus.jsonl").exists():
    demo_corpus.write_demo_corpus(work / "corpus.jsonl", documents=3000 if dry else 30000, seed=5)
common = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936, max_position_embeddings=32768,
              rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", eos_token_id=0,
              bos_token_id=0)
shapes = {"0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2),  # 494M parameters with the tied embedding
          "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2)}  # 1.54B
tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
for name, shape in shapes.items():
    shape = tiny if dry else shape
    (work / name).mkdir(exist_ok=True)
    (work / name / "config.json").write_text(json.dumps({**common, **shape}))
PY

row() {  # shape, name, accelerate config, extra flags...
  local shape=$1 name=$2 config=$3; shift 3
  local key="$shape:$name"
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $key "* ]]; then return 0; fi
  if [[ " ${PROFILE:-} " == *" $key "* ]]; then set -- "$@" --profile_dir "$WORK/profile_${shape}_$name"; fi
  local log="$WORK/${shape}_$name.log"
  accelerate launch --config_file "accelerate_configs/$config" --num_processes 1 train_loop.py \
    --config_name "$WORK/$shape" --tokenizer_name "$WORK/demo/tokenizer" \
    --train_files "$WORK/corpus.jsonl" --data_cache_dir "$WORK/cache" --validation_split_percentage 0 \
    --block_size "$BLOCK" $PRECISION --attn_implementation sdpa --per_device_train_batch_size "$MICRO_BATCH" \
    --max_steps "$STEPS" --logging_steps "$(( STEPS < 4 ? STEPS : 4 ))" --save_strategy no --eval_strategy no --report_to none \
    --output_dir "$WORK/out_${shape}_$name" --overwrite_output_dir "$@" > "$log" 2>&1 \
    || { echo "| $key failed: $(grep -m1 '^error:' "$log" || echo "tail of $log") |"; grep -q '^error:' "$log" \
         || tail -5 "$log"; return 0; }
  show "$key" "$WORK/out_${shape}_$name/metrics.jsonl"
}

show() {  # row name, metrics.jsonl: the last logged window (steps after the first 2/3: warm)
  python3 - "$1" "$2" <<'PY'
import json, sys
last = [json.loads(l) for l in open(sys.argv[2]) if '"loss"' in l][-1]
graphs = last.get("compiled_graphs")
mem = last["peak_mem_gb"]
print(f"| {sys.argv[1]:<28} | {last['tokens_per_s']:>10,.0f} | {last['step_time_s']:>7.3f} | "
      f"{100 * (last['mfu'] or 0):>5.1f}% | {mem if mem is None else round(mem, 1)!s:>6} | {last['loss']:.3f} | "
      f"{'' if graphs is None else graphs!s:>6} |", flush=True)
PY
}

trainer_row() {  # the chapter's Trainer + DeepSpeed run on the 1.5B shape, same blocks as the rows above
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" 1.5b:trainer "* ]]; then return 0; fi
  if [ $DRY = 1 ]; then echo "| 1.5b:trainer: skipped without a GPU |"; return 0; fi
  local blocks; blocks=$(ls "$WORK"/cache/*/train.npy 2>/dev/null | head -1)
  if [ -z "$blocks" ]; then echo "| 1.5b:trainer: no cache (run a 1.5b row first) |"; return 0; fi
  rm -f "$WORK/trainer.jsonl"
  torchrun --nproc_per_node 1 --master_port 29533 bench/trainer_chapter.py --config "$WORK/1.5b" \
    --cache_blocks "$blocks" --result "$WORK/trainer.jsonl" --micro_batch "$MICRO_BATCH" --steps "$STEPS" \
    --work "$WORK/trainer" > "$WORK/1.5b_trainer.log" 2>&1 \
    || { echo "| 1.5b:trainer failed: tail of $WORK/1.5b_trainer.log |"; tail -5 "$WORK/1.5b_trainer.log"; return 0; }
  python3 - "$WORK/trainer.jsonl" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])
print(f"| {'1.5b:trainer (chapter)':<28} | {r['tokens_per_s']:>10,.0f} | {r['step_time_s']:>7.3f} | "
      f"{100 * r['mfu']:>5.1f}% | {r['peak_mem_gb'] if r['peak_mem_gb'] is None else round(r['peak_mem_gb'], 1)!s:>6} | "
      f"{r['loss'] or float('nan'):.3f} |        |", flush=True)
PY
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
[ $DRY = 1 ] && echo "no CUDA GPU: a dry run with tiny shapes in fp32 (checks the script; measures nothing)"
echo "steps $STEPS (the table shows the last logged window), micro-batch $MICRO_BATCH, block $BLOCK, ${PRECISION:-fp32}"
echo "| row                          |   tokens/s |  step s |   MFU | mem GB | loss  | graphs |"
echo "|------------------------------|-----------:|--------:|------:|-------:|-------|-------:|"
row 0.5b single_gpu+compile single_gpu.yaml --torch_compile
row 0.5b zero2+compile zero2.yaml --torch_compile
CHAPTER=(--gradient_checkpointing)
row 1.5b zero2 zero2.yaml "${CHAPTER[@]}"
row 1.5b zero2+compile zero2.yaml "${CHAPTER[@]}" --torch_compile
row 1.5b zero2+liger zero2.yaml "${CHAPTER[@]}" --use_liger_kernel
row 1.5b zero2+compile+liger zero2.yaml "${CHAPTER[@]}" --torch_compile --use_liger_kernel
row 1.5b zero2+compile+fp8 zero2.yaml "${CHAPTER[@]}" --torch_compile --fp8
DOCMASK=(--attn_mask_type block_causal)  # attention within documents: dense mask (sdpa) or varlen (flash-attn)
row 1.5b zero2+compile+docmask-sdpa zero2.yaml "${CHAPTER[@]}" --torch_compile "${DOCMASK[@]}"
row 1.5b zero2+compile+docmask-fa2 zero2.yaml "${CHAPTER[@]}" --torch_compile "${DOCMASK[@]}" \
  --attn_implementation flash_attention_2  # needs the flash-attn package
row 1.5b single_gpu+compile+liger single_gpu.yaml "${CHAPTER[@]}" --torch_compile --use_liger_kernel
trainer_row
if [ -n "${ONLY:-}" ]; then  # FP8's loss against bf16's after LOSS_STEPS steps on the same blocks: only when asked
  STEPS=$LOSS_STEPS row 1.5b loss-bf16 zero2.yaml "${CHAPTER[@]}" --torch_compile
  STEPS=$LOSS_STEPS row 1.5b loss-fp8 zero2.yaml "${CHAPTER[@]}" --torch_compile --fp8
fi
if [ "${FULL:-0}" = 1 ]; then
  row 0.5b single_gpu single_gpu.yaml
  row 0.5b zero2 zero2.yaml
  row 1.5b single_gpu single_gpu.yaml "${CHAPTER[@]}"
  row 1.5b single_gpu+compile single_gpu.yaml "${CHAPTER[@]}" --torch_compile
  row 1.5b single_gpu+liger single_gpu.yaml "${CHAPTER[@]}" --use_liger_kernel
  row 1.5b zero2+compile+liger-ckpt zero2.yaml --torch_compile --use_liger_kernel
fi
for key in ${PROFILE:-}; do
  folder="$WORK/profile_${key/:/_}"
  echo; echo "costliest ops of $key (steps 6-8; trace: $folder/trace_rank0.json)"
  head -n 25 "$folder/top_ops_rank0.txt" 2>/dev/null || echo "no profile (row $key failed or was skipped)"
done
