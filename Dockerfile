# Build: the same command as the README's `cargo build --release`.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked

# Run: a small Debian with the binary, as a non-root user.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home keysworker
COPY --from=build /src/target/release/synapse-keys-worker /usr/local/bin/synapse-keys-worker
USER keysworker
# Mount Synapse's config files here (homeserver.yaml and a worker file).
VOLUME /config
ENV SYNAPSE_KEYS_WORKER_LISTEN=0.0.0.0:8585
EXPOSE 8585
HEALTHCHECK --interval=15s --timeout=3s --retries=3 CMD curl -fsS http://127.0.0.1:8585/health || exit 1
ENTRYPOINT ["synapse-keys-worker"]
CMD ["-c", "/config/homeserver.yaml", "-c", "/config/keys-worker.yaml"]
