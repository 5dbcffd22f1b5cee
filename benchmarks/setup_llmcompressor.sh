#!/usr/bin/env bash
# Install llm-compressor into its own virtual environment for benchmarks/prune_vs_llmcompressor.py.
#
# llm-compressor is a comparison target, never a runtime dependency of langprune: it pins
# transformers<=5.17 (langprune uses 5.24), so it gets a venv of its own. The two sides only
# exchange safetensors files. torch is pinned to the main venv's 2.13.0: that wheel is on
# local disk, any other version would download gigabytes.
#
#   bash benchmarks/setup_llmcompressor.sh            # creates .venv-llmc next to .venv
#   LLMC_VENV=/somewhere bash benchmarks/setup_llmcompressor.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LLMC_VENV:-$root/.venv-llmc}"
python="${PYTHON:-python3.11}"
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
cat >"$constraints" <<CONSTRAINTS
torch==2.13.0
CONSTRAINTS

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --quiet -c "$constraints" \
    "torch==2.13.0" "llmcompressor==$LLMC_VERSION" safetensors
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "llmcompressor", "compressed-tensors", "transformers"):
    print(f"{name}=={md.version(name)}")
PY
