# syntax=docker/dockerfile:1
# The operator image: a static binary on an empty base, as user 65532; no shell, no libc to
# load, no OpenSSL (rustls). The build stage runs image/rootfs.sh, which makes the image's whole
# filesystem; the runtime stage only adds the metadata.
#   docker build -t awx-token-operator:0.1.0 .            (or podman build / buildah bud)
# Without a registry (no rust image to pull), image/build.sh builds this same file: it runs
# image/rootfs.sh on the machine and hands its output to the runtime stage in place of the
# build stage (buildah bud --build-context build=DIR). Keep the build stage to that one script.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY image/rootfs.sh ./image/
RUN image/rootfs.sh /rootfs

FROM scratch
# Kept equal to Cargo.toml's version and the chart's appVersion by tests/check-generated.sh.
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="awx-token-operator" \
      org.opencontainers.image.description="Kubernetes operator that keeps Ansible AWX API tokens in Secrets, renewed and revoked" \
      org.opencontainers.image.source="https://github.com/awx-token-operator/awx-token-operator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /rootfs/ /
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/awx-token-operator"]
CMD ["run"]
