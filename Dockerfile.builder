# The stowage image built from source, for machines that can pull a Rust image:
#
#   docker build -f Dockerfile.builder --build-arg BUILD_GIT_COMMIT=$(git rev-parse --short=12 HEAD) -t stowage .
#
# The build stage runs `scripts/build-image --context-only`, the very steps of the registry-free
# build; the final stage is the top-level Dockerfile's (a test holds the two alike).
FROM docker.io/library/rust:1-bookworm AS build
WORKDIR /src
COPY . .
ARG BUILD_GIT_COMMIT=unknown
RUN BUILD_GIT_COMMIT="${BUILD_GIT_COMMIT}" scripts/build-image --context-only /context

FROM scratch

ARG VERSION=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="stowage" \
      org.opencontainers.image.description="A pull-through caching mirror and private registry for container images" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

COPY --from=build /context/etc/ /etc/
COPY --from=build /context/usr/local/bin/stowage /usr/local/bin/stowage
COPY --from=build --chown=65532:65532 /context/var/lib/stowage/ /var/lib/stowage/

# STOWAGE_CONFIG: `stowage health` and the operator commands (`docker exec ... stowage ls`)
# read the same file as the server. Every key can be overridden as STOWAGE_<TABLE>_<KEY>.
ENV PATH=/usr/local/bin \
    STOWAGE_CONFIG=/etc/stowage/config.toml \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt

USER 65532:65532
WORKDIR /var/lib/stowage
VOLUME /var/lib/stowage
EXPOSE 5000

# SIGTERM: in-flight requests get 10 s, committed fills are flushed, exit 0. Give `docker stop`
# room for that (`--stop-timeout 30`, compose's stop_grace_period).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 CMD ["stowage", "health"]

ENTRYPOINT ["stowage"]
CMD ["serve", "--config", "/etc/stowage/config.toml"]
