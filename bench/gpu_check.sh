#!/usr/bin/env bash
# bench/gpu_check.sh: on a CUDA machine, a smoke run of every strategy that fits its GPUs unchanged
# (nccl, bf16) and the benchmark of bench/baselines.py, with a 134M-parameter Llama.
#
# NOT RUN YET: no GPU was lent to the machine this project is developed on; it was checked with
# `bash -n` and shellcheck only (docs/benchmarks.md says the same).
#
#   bash bench/gpu_check.sh          # from anywhere; .venv must hold a CUDA build of torch
#
# Environment: PY (default .venv/bin/python), OUT (default bench/results/gpu_check), STEPS (smoke
# steps, default 20), SEQ (default 1024), BATCH (global batch in sequences, default 32), REPEATS (3).
#
# The model: tasks/presets.py stops at llama-58m and presets are not this script's to add, so it builds
# a Llama from config (hidden 768, 12 layers, 12 heads, MLP 2048, 32k vocabulary, untied: 134M
# parameters) and writes it as a save_pretrained() folder, which every job takes as model.name.
# Strategies: ZeRO-0..3 on all GPUs (one GPU: one rank); pipeline, model and tensor parallel need 2+.
# Exit status: 0 all passed, 1 a smoke run or the benchmark failed, 2 no CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results/gpu_check}
STEPS=${STEPS:-20}
SEQ=${SEQ:-1024}
BATCH=${BATCH:-32}
REPEATS=${REPEATS:-3}
mkdir -p "$OUT"
export DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled

if ! command -v nvidia-smi >/dev/null 2>&1 || ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device (nvidia-smi, torch.cuda.is_available()); nothing run" >&2
  exit 2
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee "$OUT/gpus.csv"
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
RANKS=$(( NGPU >= 2 ? 2 : 1 ))
echo "$NGPU GPU(s); multi-rank arms use $RANKS" | tee "$OUT/summary.txt"

# 1. the model folder (random init, seed 0) with the Llama SentencePiece tokenizer the presets use
MODEL="$OUT/llama-134m"
if [ ! -f "$MODEL/config.json" ]; then
  "$PY" - "$MODEL" <<'EOF' || exit 1
import sys

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tasks.causal_lm import builtin_tokenizer

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
print(f"llama-134m: {sum(p.numel() for p in model.parameters()):,} parameters")
model.save_pretrained(sys.argv[1])
builtin_tokenizer("llama-sp").save_pretrained(sys.argv[1])
EOF
fi

# 2. the peak behind MFU: the datasheet's for known GPUs, else measured (and cached)
"$PY" -m launcher.cli peak --device cuda --dtype bf16 fp32 --threads 1 | tee "$OUT/peak.txt"

# 3. smoke: every strategy that fits, bf16, nccl, the shipped configs unchanged
HOSTS="$OUT/hostfile"
echo "localhost slots=$NGPU" > "$HOSTS"
strategies="zero0 zero1 zero2 zero3"
if [ "$NGPU" -ge 2 ]; then
  strategies="$strategies pipeline model_parallel tensor_parallel"
fi
status=0
for s in $strategies; do
  log="$OUT/smoke_$s.log"
  if "$PY" -m launcher.cli launch jobs/compare.yaml --ds-config "ds_configs/${s}_bf16.json" --hostfile "$HOSTS" \
      --set "model.name=$MODEL" "data.block_size=$SEQ" "train.max_steps=$STEPS" "train.output_dir=$OUT/runs/$s" \
      train.export=false train.log_every=1 >"$log" 2>&1; then
    echo "smoke $s: ok; $(grep -E '^ +(final train loss|tokens/s|MFU) ' "$log" | tr -s ' ' | tr '\n' ';')" | tee -a "$OUT/summary.txt"
  else
    echo "smoke $s: FAILED; see $log" | tee -a "$OUT/summary.txt"
    tail -n 20 "$log"
    status=1
  fi
done

# 4. the benchmark: plain PyTorch DDP, the HF Trainer + DeepSpeed, labs ZeRO-0..3 and one process
if ! "$PY" bench/baselines.py --device cuda --ranks "$RANKS" --precision bf16 --model "$MODEL" --seq "$SEQ" \
    --global_batch "$BATCH" --steps "$STEPS" --repeats "$REPEATS" --out "$OUT/baselines"; then
  echo "benchmark: FAILED" | tee -a "$OUT/summary.txt"
  status=1
fi
echo "gpu_check: exit $status; results in $OUT (summary.txt, baselines/baselines.md)"
exit "$status"
