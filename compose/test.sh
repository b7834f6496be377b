#!/usr/bin/env bash
# The compose stack's test: builds the images the no-registry way (images.sh, from the binaries
# the test build made), then runs test_stack.py against the stack. Writes its measurements to
# $COMPOSE_RESULT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-target/pyenv/bin/python}
TANDEM_BIN=${TANDEM_BIN:-target/debug/tandem} bash compose/images.sh
"$PYTHON" compose/test_stack.py ${COMPOSE_RESULT:+--out "$COMPOSE_RESULT"}
