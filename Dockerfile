# syntax=docker/dockerfile:1
#
# One image for every role of the `ticketing` binary:
#   docker build -t tickets .
#   docker run --rm -e JWT_KEY=change-me -p 3000:3000 tickets            # `ticketing all` (SQLite)
#   docker run --rm -e JWT_KEY=... -e MONGO_URI=... tickets api          # or worker / scheduler
#
# Stages: chef (toolchain + cargo-chef) -> planner (recipe.json: the dependency graph only)
# -> builder (compiles the dependencies from the recipe: a layer that stays cached until
# Cargo.toml/Cargo.lock change; then the workspace itself) -> runtime (debian slim, non-root).

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS chef
# The workspace needs Rust 1.89+ (edition 2024); rust:1 is the latest stable.
# gcc (for rusqlite's bundled SQLite) is part of the rust image.
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /app

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
# SQLite's compile-time options (LIBSQLITE3_FLAGS): the cooked dependencies must see them too.
COPY .cargo/ .cargo/
# Dependencies only: cached as long as the recipe (manifests + lock file) is unchanged.
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin ticketing
# The sources (common/migrations/*.sql are include_str!'d, so they are needed here).
COPY . .
# The release profile keeps line tables (file:line in backtraces); compressing them makes the
# binary ~2.5x smaller and backtraces still resolve.
RUN cargo build --release --locked --bin ticketing \
 && objcopy --compress-debug-sections target/release/ticketing /usr/local/bin/ticketing

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: rustls loads the system roots for TLS to MongoDB Atlas, webhooks, etc.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 ticketing \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /app --shell /usr/sbin/nologin ticketing \
 && mkdir -p /app/data \
 && chown 10001:10001 /app/data
COPY --from=builder /usr/local/bin/ticketing /usr/local/bin/ticketing
WORKDIR /app
# Numeric so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
# SQLITE_PATH is only used without MONGO_URI (`ticketing all` on one machine); with MONGO_URI
# the binary writes nothing to disk, so a read-only root filesystem works.
ENV PORT=3000 \
    HEALTH_PORT=9090 \
    SQLITE_PATH=/app/data/tickets.db \
    RUST_LOG=info \
    LOG_FORMAT=json
# 3000: the API (and its /healthz, /readyz, /metrics); 9090: worker/scheduler health and metrics.
EXPOSE 3000 9090
# The binary handles SIGTERM itself (drains HTTP, finishes its claims), so it runs as PID 1.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ticketing"]
CMD ["all"]
