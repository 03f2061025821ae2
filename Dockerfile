# The stowage image: one static binary, CA certificates, the shipped config and nothing else.
#
# Built by `scripts/build-image [TAG]`, which compiles the binary on the host and stages this
# file's context (usr/local/bin/stowage, etc/ssl/certs/ca-certificates.crt,
# etc/stowage/config.toml with storage.path = "/var/lib/stowage", etc/passwd, etc/group); it
# starts FROM scratch, so building it contacts no registry. Dockerfile.builder builds the same
# image from source where a Rust builder image can be pulled.
#
#   docker run -d -p 5000:5000 --restart=always -v /srv/stowage:/var/lib/stowage stowage
#   (the volume must be writable by uid 65532: chown 65532:65532 /srv/stowage)
FROM scratch

ARG VERSION=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="stowage" \
      org.opencontainers.image.description="A pull-through caching mirror and private registry for container images" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

COPY etc/ /etc/
COPY usr/local/bin/stowage /usr/local/bin/stowage
COPY --chown=65532:65532 var/lib/stowage/ /var/lib/stowage/

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
