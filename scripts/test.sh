#!/usr/bin/env bash
# The test command: fetch the default model if missing, then run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet -p tandem -- fetch-model >/dev/null
cargo test --workspace "$@"
