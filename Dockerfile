# regcache container image.
#
#   docker build -t ghcr.io/regcache/regcache:latest .
#   docker run -d --name regcache -p 5000:5000 -p 127.0.0.1:9090:9090 \
#     -v regcache-cache:/var/cache/regcache ghcr.io/regcache/regcache:latest
#
# Needs BuildKit (the default builder since Docker 23; buildah and podman support it too) for
# the cache mounts below, which keep the cargo registry and target directory between builds.

ARG RUST_VERSION=1

# ---- build -------------------------------------------------------------------------------
# Bookworm, to match the glibc of the distroless runtime image (Debian 12).
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
# --locked: build exactly the dependency versions in Cargo.lock. The binary is copied out
# of the cache mount, because the mount is not part of the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin regcache \
    && install -D -m 0755 target/release/regcache /out/regcache

# The image's configuration: the documented defaults (config.example.toml, also the
# embedded default) with two changes for a container:
#   - the admin listener (/metrics, /healthz, /readyz) on 0.0.0.0:9090 instead of loopback,
#     so probes and Prometheus can reach it from outside the container;
#   - the cache in /var/cache/regcache, a volume, instead of ./regcache-data.
# The greps stop the build if config.example.toml changed and a substitution no longer
# applies. check-config validates the result with the binary just built.
RUN { echo '# regcache container configuration: config.example.toml with the admin listener'; \
      echo '# on 0.0.0.0:9090 and the cache in /var/cache/regcache. Mount your own file here'; \
      echo '# to change it (keep the admin listener on 0.0.0.0 for probes and metrics).'; \
      echo; \
      sed -e 's|^listen = "127.0.0.1:9090"$|listen = "0.0.0.0:9090"|' \
          -e 's|^dir = "./regcache-data"$|dir = "/var/cache/regcache"|' \
          config.example.toml; \
    } > /out/config.toml \
    && grep -qx 'listen = "0.0.0.0:9090"' /out/config.toml \
    && grep -qx 'dir = "/var/cache/regcache"' /out/config.toml \
    && /out/regcache check-config --config /out/config.toml > /dev/null \
    && mkdir -p /out/cache

# ---- runtime -----------------------------------------------------------------------------
# distroless/cc: glibc, libgcc and CA certificates, no shell or package manager. The
# ":nonroot" variant runs as uid/gid 65532. regcache links against nothing else: TLS is
# rustls, not OpenSSL.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/regcache /usr/local/bin/regcache
COPY --from=builder /out/config.toml /etc/regcache/config.toml
# An empty cache directory owned by the runtime user. A new named volume mounted here
# takes this ownership, so the cache is writable without running as root.
COPY --from=builder --chown=65532:65532 /out/cache /var/cache/regcache
USER 65532:65532
# 5000: registry API. 9090: /metrics, /healthz, /readyz.
EXPOSE 5000 9090
# Keep the cache out of the container's writable layer. That layer is thrown away with the
# container, and it makes `docker run --read-only` impossible.
VOLUME ["/var/cache/regcache"]
# No HEALTHCHECK: the image has no shell or curl to run one. Use Kubernetes probes or your
# orchestrator's HTTP check against :9090/healthz (liveness) and :9090/readyz (readiness).
# Docker's `docker stop` sends SIGTERM, and regcache drains in-flight requests on it. Give it
# time with `docker stop -t 60`.
ENTRYPOINT ["/usr/local/bin/regcache", "serve"]
CMD ["--config", "/etc/regcache/config.toml"]
