# hybridstore: multi-stage build, small non-root runtime image.
#   docker build -t hybridstore .
#   docker compose -f docker-compose.hybrid.yml up -d
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin hybridstore \
    && cp target/release/hybridstore /usr/local/bin/hybridstore

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin hybridstore \
    && mkdir -p /var/lib/hybridstore/data /var/lib/hybridstore/backups \
    && chown -R hybridstore:hybridstore /var/lib/hybridstore
COPY --from=build /usr/local/bin/hybridstore /usr/local/bin/hybridstore
USER hybridstore
# The default run is embedded mode: its SQLite file, its admin token and the
# backups live here, owned by the runtime user; mount a volume to keep them.
# (config/default.toml, when mounted under it, is read from here too.)
WORKDIR /var/lib/hybridstore
VOLUME ["/var/lib/hybridstore"]
ENV HOST=0.0.0.0 \
    PORT=8080 \
    LOG_FORMAT=json \
    DATA_DIR=/var/lib/hybridstore/data \
    BACKUP_DIR=/var/lib/hybridstore/backups
EXPOSE 8080
# Liveness: the process answers GET /health (no token, no tier needed).
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["hybridstore", "ping"]
ENTRYPOINT ["hybridstore"]
CMD ["serve"]
