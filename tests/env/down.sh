#!/usr/bin/env bash
# Stop everything recorded under RUN_DIR: services with a RUN_DIR/*/pid file, the AWX stand-ins'
# PostgreSQL servers (RUN_DIR/*/pg), containers (RUN_DIR/containers), then the cluster.
# Idempotent; keeps RUN_DIR (logs) in place.
#   usage: down.sh RUN_DIR
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"
[ $# = 1 ] || { echo "usage: $0 RUN_DIR" >&2; exit 2; }
[ -d "$1" ] || exit 0
RUN_DIR="$(cd "$1" && pwd -P)"

for f in "$RUN_DIR"/*/pid; do
  [ -f "$f" ] || continue
  log "stopping ${f%/pid} (pid $(cat "$f"))"
  stop_pidfile "$f"
done
# AWX stand-ins (RUN_DIR/*/pg): their PostgreSQL servers too.
for d in "$RUN_DIR"/*/pg/data; do
  [ -f "$d/postmaster.pid" ] || continue
  log "stopping the stand-in database in ${d%/pg/data}"
  "$HERE/../awx-standin/standin.sh" stop "${d%/pg/data}" || true
done
# The image scenario's containers (tests/e2e/image.rs), in a container store of the run's own.
if [ -d "$RUN_DIR/containers" ]; then
  log "removing the containers of $RUN_DIR/containers"
  "$HERE/../../image/containers.sh" "$RUN_DIR/containers" clean || true
fi
"$HERE/cluster.sh" stop "$RUN_DIR"
