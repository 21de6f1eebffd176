#!/usr/bin/env bash
# Fails when a generated file differs from what the code generates now: the CRD in crds/ and its
# copy in the Helm chart; the plain manifests in deploy/ (rendered from the chart by
# deploy/generate.sh, which needs helm); the version the chart and the Dockerfile carry; and the
# Dockerfile's stages, which image/build.sh relies on.
# Regenerate with: tests/check-generated.sh --fix
set -euo pipefail
cd "$(dirname "$0")/.."
crd="crds/awxtokens.awx-token-operator.io.yaml"
copies=("$crd")
[ -d charts/awx-token-operator/crds ] && copies+=("charts/awx-token-operator/crds/awxtokens.awx-token-operator.io.yaml")
fresh="$(mktemp)"; rendered="$(mktemp -d)"; trap 'rm -rf "$fresh" "$rendered"' EXIT
cargo run --quiet -- crd > "$fresh"
status=0
for f in "${copies[@]}"; do
  if [ "${1:-}" = --fix ]; then
    cp "$fresh" "$f"; echo "wrote $f"
  elif ! diff -u "$f" "$fresh" >/dev/null 2>&1; then
    echo "stale: $f differs from 'awx-token-operator crd' (run tests/check-generated.sh --fix)" >&2
    diff -u "$f" "$fresh" | head -20 >&2 || true
    status=1
  fi
done
checked=("${copies[@]}")

# The connection kinds' CRDs, in crds/ and in the chart.
for kind in cluster-awx-connection awx-connection; do
  case "$kind" in
    cluster-awx-connection) base="clusterawxconnections.awx-token-operator.io.yaml" ;;
    awx-connection) base="awxconnections.awx-token-operator.io.yaml" ;;
  esac
  cargo run --quiet -- connection-crd "$kind" > "$fresh"
  for f in "crds/$base" "charts/awx-token-operator/crds/$base"; do
    if [ "${1:-}" = --fix ]; then
      cp "$fresh" "$f"; echo "wrote $f"
    elif ! diff -u "$f" "$fresh" >/dev/null 2>&1; then
      echo "stale: $f differs from 'awx-token-operator connection-crd $kind' (run tests/check-generated.sh --fix)" >&2
      status=1
    fi
    checked+=("$f")
  done
done

# deploy/ is rendered from the chart (and its CRD copy), so it is checked after them.
if [ -x deploy/generate.sh ]; then
  if [ "${1:-}" = --fix ]; then
    deploy/generate.sh
  else
    if ! log="$(deploy/generate.sh "$rendered" 2>&1)"; then
      echo "deploy/generate.sh failed: $log" >&2
      status=1
    elif ! diff -r -x generate.sh deploy "$rendered" >/dev/null 2>&1; then
      echo "stale: deploy/ differs from the chart (run deploy/generate.sh or tests/check-generated.sh --fix)" >&2
      diff -r -u -x generate.sh deploy "$rendered" | head -40 >&2 || true
      status=1
    fi
  fi
  checked+=(deploy/)
fi

# The chart's appVersion and the image's version label are the crate's version (not fixed
# by --fix: a release changes them on purpose).
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
if [ -f charts/awx-token-operator/Chart.yaml ]; then
  app="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/awx-token-operator/Chart.yaml)"
  if [ "$app" != "$version" ]; then
    echo "stale: charts/awx-token-operator/Chart.yaml appVersion '$app' is not Cargo.toml's version '$version'" >&2
    status=1
  fi
  checked+=("Chart.yaml appVersion")
fi
if [ -f Dockerfile ]; then
  label="$(sed -n 's/^ARG VERSION=\(.*\)$/\1/p' Dockerfile)"
  if [ "$label" != "$version" ]; then
    echo "stale: Dockerfile ARG VERSION '$label' is not Cargo.toml's version '$version'" >&2
    status=1
  fi
  checked+=("Dockerfile VERSION")
  # image/build.sh builds this Dockerfile with the output of image/rootfs.sh in place of its
  # build stage: that is the same image only while the build stage runs that script and
  # nothing else, and the runtime stage takes nothing but its output.
  stages="$(grep -E '^(FROM|RUN|COPY|ADD) ' Dockerfile | tr -s ' ')"
  want_stages="FROM rust:1-bookworm AS build
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY image/rootfs.sh ./image/
RUN image/rootfs.sh /rootfs
FROM scratch
COPY --from=build /rootfs/ /"
  if [ "$stages" != "$want_stages" ]; then
    echo "Dockerfile: the build stage must be 'RUN image/rootfs.sh /rootfs' alone and the runtime stage FROM scratch with only 'COPY --from=build /rootfs/ /' (image/build.sh relies on it); found:" >&2
    printf '%s\n' "$stages" >&2
    status=1
  fi
  grep -qx '!image/rootfs.sh' .dockerignore || { echo ".dockerignore leaves image/rootfs.sh out of the build context" >&2; status=1; }
  checked+=("Dockerfile stages")
fi
[ "$status" = 0 ] && echo "generated files are current: ${checked[*]}"
exit "$status"
