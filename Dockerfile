# syntax=docker/dockerfile:1
# The operator image: built with the Rust toolchain, run on distroless (glibc, CA certificates,
# no shell, user 65532). rustls does TLS, so no OpenSSL is needed at build or run time.
#   docker build -t awx-token-operator:0.1.0 .
# Not built by this repository's CI (its machines have no container engine).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin awx-token-operator \
 && cp target/release/awx-token-operator /awx-token-operator \
 && /awx-token-operator --version

FROM gcr.io/distroless/cc-debian12:nonroot
# Kept equal to Cargo.toml's version by tests/check-generated.sh.
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="awx-token-operator" \
      org.opencontainers.image.description="Kubernetes operator that keeps Ansible AWX API tokens in Secrets, renewed and revoked" \
      org.opencontainers.image.source="https://github.com/awx-token-operator/awx-token-operator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /awx-token-operator /awx-token-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/awx-token-operator"]
CMD ["run"]
