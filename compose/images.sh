#!/usr/bin/env bash
# Builds every image compose.yaml needs from local parts only, for a machine that reaches no
# image registry but does reach a Debian mirror:
#
#   debian:bookworm-slim         a Debian base made with debootstrap from the mirror this
#                                machine's apt uses (read from its sources at run time), imported
#                                under the name the Dockerfile starts FROM
#   tandem:latest                the Dockerfile's `prebuilt` stage: the tandem binary already
#                                built on this machine, and the default model
#   redis:7                      Debian's redis-server
#   prom/prometheus:v2.53.0      Debian's prometheus
#   nginx:1.27                   Debian's nginx (the load balancer in front of the gateways)
#   jaegertracing/jaeger:2.5.0   a stand-in for Jaeger: an OTLP receiver (4317, 4318) that answers
#                                Jaeger's query API on 16686 (tandem-test-support's otlp_sink)
#
# An image that already exists under its name is kept (so a machine with the real images, or a
# second run, builds nothing twice). Environment:
#   TANDEM_BIN    the tandem binary (default: target/release/tandem, else target/debug/tandem)
#   SINK_BIN      the receiver (default: examples/otlp_sink beside it; built if missing)
#   IMAGES_WORK   scratch space (default: target/images)
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${IMAGES_WORK:-target/images}
mkdir -p "$WORK"

have() { docker image inspect "$1" >/dev/null 2>&1; }

# The mirror and suite this machine's apt uses: deb822 sources first, then the one-line format.
apt_mirror() {
    local uri=""
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk '/^URIs:/ {print $2; exit}' "$f")
        [ -n "$uri" ] && break
    done
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || { echo "images.sh: no Debian mirror in the apt sources" >&2; exit 1; }
    echo "$uri"
}
SUITE=bookworm

if ! have debian:bookworm-slim; then
    command -v debootstrap >/dev/null || { echo "images.sh: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    MIRROR=$(apt_mirror)
    echo "images.sh: debootstrap $SUITE from $MIRROR"
    rm -rf "$WORK/rootfs"
    # What the Tandem image needs at run time comes in here already, so its own apt step has
    # nothing left to fetch.
    debootstrap --variant=minbase --include=ca-certificates,libibverbs1,librdmacm1,ibverbs-providers,hostname \
        "$SUITE" "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    tar -C "$WORK/rootfs" -c . | docker import --change 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
    rm -rf "$WORK/rootfs"
fi

BIN=${TANDEM_BIN:-}
if [ -z "$BIN" ]; then
    if [ -x target/release/tandem ]; then BIN=target/release/tandem; else BIN=target/debug/tandem; fi
fi
[ -x "$BIN" ] || { echo "images.sh: no tandem binary at $BIN (cargo build --release -p tandem)" >&2; exit 1; }
SINK=${SINK_BIN:-$(dirname "$BIN")/examples/otlp_sink}

if ! have tandem:latest; then
    ctx="$WORK/tandem"
    rm -rf "$ctx" && mkdir -p "$ctx/models"
    cp "$BIN" "$ctx/tandem" && strip "$ctx/tandem" 2>/dev/null || true
    model=$("$BIN" fetch-model)
    cp "$model" "$ctx/models/"
    docker build -q --target prebuilt -t tandem:latest -f Dockerfile "$ctx" >/dev/null
    rm -rf "$ctx"
fi

# A small image from Debian's packages: NAME, the packages, then Dockerfile lines.
debian_image() {
    local name=$1 packages=$2
    shift 2
    have "$name" && return 0
    local ctx="$WORK/$(echo "$name" | tr '/:' '__')"
    rm -rf "$ctx" && mkdir -p "$ctx"
    {
        echo "FROM debian:bookworm-slim"
        echo "RUN apt-get update && apt-get install -y --no-install-recommends $packages && rm -rf /var/lib/apt/lists/*"
        printf '%s\n' "$@"
    } >"$ctx/Dockerfile"
    docker build -q -t "$name" "$ctx" >/dev/null
    rm -rf "$ctx"
}

debian_image redis:7 redis-server 'CMD ["redis-server", "--protected-mode", "no"]'
debian_image prom/prometheus:v2.53.0 prometheus 'ENTRYPOINT ["prometheus"]'
debian_image nginx:1.27 nginx 'CMD ["nginx", "-g", "daemon off;"]'

if ! have jaegertracing/jaeger:2.5.0; then
    if [ ! -x "$SINK" ]; then
        profile=$([ "$(basename "$(dirname "$BIN")")" = release ] && echo --release || true)
        cargo build $profile -q -p tandem-test-support --example otlp_sink
    fi
    ctx="$WORK/jaeger"
    rm -rf "$ctx" && mkdir -p "$ctx"
    cp "$SINK" "$ctx/otlp_sink" && strip "$ctx/otlp_sink" 2>/dev/null || true
    cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM debian:bookworm-slim
COPY otlp_sink /usr/local/bin/otlp_sink
EXPOSE 4317 4318 16686
ENTRYPOINT ["otlp_sink", "--grpc", "0.0.0.0:4317", "--http", "0.0.0.0:4318", "--query", "0.0.0.0:16686"]
DOCKERFILE
    docker build -q -t jaegertracing/jaeger:2.5.0 "$ctx" >/dev/null
    rm -rf "$ctx"
fi

docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^(debian:bookworm-slim|tandem:latest|redis:7|prom/prometheus:v2.53.0|nginx:1.27|jaegertracing/jaeger:2.5.0) '
