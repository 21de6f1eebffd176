#!/usr/bin/env bash
# Fails when a generated file differs from what the code generates now: the CRD in crds/ and its
# copy in the Helm chart. Regenerate with: tests/check-generated.sh --fix
set -euo pipefail
cd "$(dirname "$0")/.."
crd="crds/awxtokens.awx-token-operator.io.yaml"
copies=("$crd")
[ -d charts/awx-token-operator/crds ] && copies+=("charts/awx-token-operator/crds/awxtokens.awx-token-operator.io.yaml")
fresh="$(mktemp)"; trap 'rm -f "$fresh"' EXIT
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
[ "$status" = 0 ] && echo "generated files are current: ${copies[*]}"
exit "$status"
