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
cargo run --quiet -p tandem -- fetch-model >/dev/null
cargo test --workspace "$@"
