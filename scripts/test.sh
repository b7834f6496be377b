#!/usr/bin/env bash
# The test command: fetch what the tests need if missing, then run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet -p tandem -- fetch-model >/dev/null
# The official OpenAI client, which one cluster test drives Tandem with.
python3 -c "import openai" 2>/dev/null || python3 -m pip install --quiet openai
cargo test --workspace "$@"
