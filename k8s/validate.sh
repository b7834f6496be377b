#!/usr/bin/env bash
# Validates the Kubernetes manifests offline (no cluster is needed or contacted):
#   1. renders every overlay, and the prometheus-adapter rules, with kustomize;
#   2. checks every rendered document strictly against the Kubernetes 1.33 schemas
#      (kubernetes-validate), and custom resources against k8s/schemas/;
#   3. checks that the parts refer to each other (HPA metrics and the adapter rules and the
#      exported gauges, ports, probes, grace periods: check_wiring.py);
#   4. checks every flag and TANDEM_/OTEL_/HF_ variable given to tandem, here and in
#      compose/compose.yaml, against `tandem <subcommand> --help` (check_cli.py, after its
#      self-test).
# Needs kubectl (for `kubectl kustomize`, kustomize v5) or a kustomize binary (KUSTOMIZE), python3
# with venv, PyPI for the first run, and the tandem binary (TANDEM_BIN, default
# target/debug/tandem).
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.33
VALIDATOR_VERSION=1.37.0
VENV=target/k8s-venv
OUT=target/k8s
export TANDEM_BIN="${TANDEM_BIN:-target/debug/tandem}"

if [ -n "${KUSTOMIZE:-}" ]; then
    render() { "$KUSTOMIZE" build "$1"; }
elif command -v kubectl >/dev/null 2>&1; then
    render() { kubectl kustomize "$1"; }
else
    echo "validate.sh: needs kubectl (kubectl kustomize) or KUSTOMIZE=/path/to/kustomize" >&2
    exit 1
fi

# The validator and its schemas, in a virtual environment of their own.
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('kubernetes-validate') != '$VALIDATOR_VERSION')" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$VALIDATOR_VERSION"
fi
PY="$VENV/bin/python"

rm -rf "$OUT"
mkdir -p "$OUT"

# Runs a check; prints its report under a label, or shows it and stops the script when it fails.
step() {
    local label=$1 out
    shift
    if ! out=$("$@" 2>&1); then
        printf '%s\n' "$out" >&2
        echo "validate.sh: failed: $*" >&2
        exit 1
    fi
    printf '%s\n' "$out" | sed "s/^/$label /"
}

# 1. Render.
overlays=()
for dir in k8s/overlays/*/; do
    overlays+=("$OUT/$(basename "$dir").yaml")
    render "$dir" > "$OUT/$(basename "$dir").yaml"
    echo "rendered   ${dir%/} ($(grep -c '^kind:' "$OUT/$(basename "$dir").yaml") documents)"
done
render k8s/prometheus-adapter > "$OUT/prometheus-adapter.yaml"
echo "rendered   k8s/prometheus-adapter ($(grep -c '^kind:' "$OUT/prometheus-adapter.yaml") documents)"
targets=("${overlays[@]}" "$OUT/prometheus-adapter.yaml")

# 2. Schemas. kubernetes-validate only warns (and exits 0) on a kind it has no schema for, so any
# output at all under --quiet is a failure.
for f in "${targets[@]}"; do
    name=$(basename "$f" .yaml)
    step "schemas   " "$PY" k8s/check_schemas.py --builtin-out "$OUT/$name.builtin.yaml" "$f"
    set +e
    report=$("$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" --quiet "$OUT/$name.builtin.yaml" 2>&1)
    rc=$?
    set -e
    if [ "$rc" -ne 0 ] || [ -n "$report" ]; then
        echo "$report" >&2
        echo "validate.sh: $name does not validate against Kubernetes $K8S_VERSION" >&2
        exit 1
    fi
    echo "schemas    $name: every built-in document valid (strict, Kubernetes $K8S_VERSION)"
done

# 3. Wiring.
step "wiring    " "$PY" k8s/check_wiring.py --adapter-config k8s/prometheus-adapter/config.yaml "${overlays[@]}"

# 4. Flags and variables, once the checker has shown it catches a bogus flag.
step "cli       " "$PY" k8s/check_cli.py --self-test
step "cli       " "$PY" k8s/check_cli.py --compose compose/compose.yaml "${overlays[@]}"

echo "validate.sh: passed (${#overlays[@]} overlays and the adapter rules; not applied to any cluster)"
