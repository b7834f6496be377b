#!/usr/bin/env bash
# The test command: fetch what the tests need if missing, then run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
# A virtual environment of the project's own (under target/, so it is never committed) holds the
# official OpenAI client, which one cluster test drives Tandem with, and the pip that fetches the
# default model: system Pythons refuse packages installed beside theirs (PEP 668), and some have no
# pip at all.
VENV=${TANDEM_VENV:-target/pyenv}
if ! "$VENV/bin/python" -c "import openai" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check openai
fi
PYTHON="$(cd "$VENV/bin" && pwd)/python"
export PYTHON
# NVRTC (the CUDA runtime compiler, CPU only) from PyPI, so that the CUDA engine's kernels are
# compiled for every architecture it runs on without a GPU (tandem-cuda's compile test); the
# version the engine is built against (cudarc's cuda-13000).
NVRTC_VERSION=13.0.88
if ! "$PYTHON" -c "import importlib.metadata as m; assert m.version('nvidia-cuda-nvrtc') == '$NVRTC_VERSION'" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check "nvidia-cuda-nvrtc==$NVRTC_VERSION"
fi
NVRTC_LIB=$("$PYTHON" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13', 'lib'))")
export LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo run --quiet -p tandem -- fetch-model >/dev/null
cargo test --workspace "$@"
