#!/usr/bin/env bash
# Stops everything demo/up.sh started and removes its directory.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEMO="${AWXTO_DEMO_DIR:-/tmp/awx-token-operator-demo}"
[ -d "$DEMO" ] || { echo "no demo running in $DEMO"; exit 0; }
"$ROOT/tests/env/down.sh" "$DEMO"
rm -rf "$DEMO"
echo "demo stopped"
