# Build: the same command as the README's `cargo build --release`.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked

# Run: a small Debian with the binary, as a non-root user. No apt-get here:
# the only thing the binary needs beyond glibc is the CA bundle (for TLS to
# remote homeservers), taken from the build stage (the same Debian release),
# and the health check uses bash instead of curl.
FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 keysworker \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin keysworker
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /src/target/release/synapse-keys-worker /usr/local/bin/synapse-keys-worker
USER 10001:10001
# Mount Synapse's config files here (homeserver.yaml and a worker file).
VOLUME /config
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    SYNAPSE_KEYS_WORKER_LISTEN=0.0.0.0:8585
EXPOSE 8585
# GET /health over bash's /dev/tcp; healthy when the status line says 200.
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8585 && printf 'GET /health HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && read -r _ code _ <&3 && [ \"$code\" = 200 ]"]
ENTRYPOINT ["synapse-keys-worker"]
CMD ["-c", "/config/homeserver.yaml", "-c", "/config/keys-worker.yaml"]
