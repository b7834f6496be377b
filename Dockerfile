# Tandem's image: one binary (`tandem`) that runs any role, with the default model inside.
#
# With a registry:   docker build -t tandem .          (compiles from source: the `runtime` stage)
#                    docker-compose -f compose/compose.yaml up --build
# Without one:       compose/images.sh                 (the `prebuilt` stage, from a binary built
#                                                       on the host; see compose/README.md)
#
# The runtime runs as the unprivileged user `tandem` (uid 10001). The default model
# (SmolLM2-135M-Instruct, 98 MB) is in the image, so a container serves with no network and no
# volume; another model is a mounted folder (`--model /models/NAME`, or TANDEM_MODEL) or a hub id
# (fetched into HF_HOME, with HF_TOKEN for gated ones).

ARG DEBIAN_IMAGE=debian:bookworm-slim

# What every Tandem image runs on: the RDMA libraries UCX links, and the user.
FROM ${DEBIAN_IMAGE} AS base
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libibverbs1 librdmacm1 ibverbs-providers \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin tandem \
    && mkdir -p /opt/tandem/models /home/tandem/.cache/huggingface \
    && chown -R tandem /home/tandem/.cache
ENV TANDEM_MODEL_DIR=/opt/tandem/models \
    HF_HOME=/home/tandem/.cache/huggingface
EXPOSE 8000 9000 9090 7000

# A binary and model built outside (compose/images.sh puts them in the build context).
FROM base AS prebuilt
COPY tandem /usr/local/bin/tandem
COPY models/ /opt/tandem/models/
USER tandem
ENTRYPOINT ["tandem"]

# From source.
FROM rust:1-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends libibverbs-dev librdmacm-dev make gcc python3-pip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p tandem && strip target/release/tandem \
    && TANDEM_MODEL_DIR=/models target/release/tandem fetch-model

FROM base AS runtime
COPY --from=build /src/target/release/tandem /usr/local/bin/tandem
COPY --from=build /models/ /opt/tandem/models/
USER tandem
ENTRYPOINT ["tandem"]
