#!/usr/bin/env bash
# AWX stand-in for end-to-end tests (see README.md).
#
#   standin.sh start RUN_DIR [--mode awx|gateway|generic] [--port N] [--tls-cert F --tls-key F]
#                            [--password-hash-iterations N]
#       prints the base URL as its last stdout line; writes RUN_DIR/{pid,port,url,mode}
#   standin.sh stop RUN_DIR
#   standin.sh venv [MODE]     create the virtualenv of MODE (default awx; awxkit: the awx CLI) if
#                              needed, print its path
#   standin.sh test [ARGS]     run test_standin.py with pytest (installed into the venv)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${AWXTO_CACHE:-$HOME/.cache/awx-token-operator}"

# Two virtualenvs: AWX 24.6.1's stack (modes awx, generic) and the gateway's django-ansible-base
# stack (mode gateway); a third, awxkit, is not a stand-in but the awx CLI the e2e suite runs
# against one (`standin.sh venv awxkit`). use_venv MODE sets REQ and VENV.
use_venv() {
  local name=standin-venv
  case "$1" in
    gateway) REQ="$HERE/requirements-gateway.txt";;
    awxkit) REQ="$HERE/requirements-awxkit.txt"
      name="awxkit-$(sed -n 's/^awxkit==//p' "$REQ")-venv";;
    *) REQ="$HERE/requirements.txt";;
  esac
  VENV="$CACHE/$name-$(sha256sum "$REQ" | cut -c1-12)"
}
use_venv awx

log() { echo "standin: $*" >&2; }
die() { log "$*"; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi
}

make_venv() {
  rm -rf "$VENV"
  if ! python3 -m venv "$VENV" >&2; then
    # Debian ships venv/ensurepip in a separate package.
    rm -rf "$VENV"
    command -v apt-get >/dev/null || die "python3 -m venv failed and apt-get is not available"
    log "installing python3-venv with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || true
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2 \
      || die "could not install python3-venv"
    python3 -m venv "$VENV" >&2 || die "python3 -m venv failed"
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ" >&2 \
    || { rm -rf "$VENV"; die "pip install -r $REQ failed"; }
  touch "$VENV/.complete"
}

ensure_venv() {
  [ -f "$VENV/.complete" ] && return 0
  mkdir -p "$CACHE"
  if command -v flock >/dev/null; then
    (
      flock 9
      [ -f "$VENV/.complete" ] || make_venv
    ) 9>"$VENV.lock"
  else
    make_venv
  fi
  [ -f "$VENV/.complete" ] || die "virtualenv $VENV was not created"
}

# ---------------------------------------------------------------- PostgreSQL
# Each stand-in has its own PostgreSQL cluster in RUN_DIR/pg (data/, the unix socket, postgres.log),
# copied from a cluster made once by initdb and cached under $CACHE keyed by the server's version.
# The server runs as the invoking user, or as "postgres" when that is root (PostgreSQL refuses root).
PG_BIN=""
PG_USER=""
PG_CONF_REV=2   # bump when the template's settings below change

find_pg() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r) "$(pg_config --bindir 2>/dev/null || true)"; do
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then PG_BIN=$d; return 0; fi
  done
  return 1
}

ensure_pg() {
  mkdir -p "$CACHE"
  if ! find_pg; then
    command -v apt-get >/dev/null || die "PostgreSQL (initdb, pg_ctl, postgres) not found and apt-get is not available"
    (
      flock 9
      if ! find_pg; then
        log "installing Debian's postgresql with apt-get"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || true
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
      fi
    ) 9>"$CACHE/.standin-apt.lock" || die "could not install postgresql"
    find_pg || die "postgresql is installed but its initdb was not found"
  fi
  if [ "$(id -u)" = 0 ]; then
    PG_USER=postgres
    id "$PG_USER" >/dev/null 2>&1 || die "running as root needs the system user postgres (Debian's postgresql package creates it)"
  fi
}

as_pg() {
  if [ -n "$PG_USER" ]; then runuser -u "$PG_USER" -- "$@"; else "$@"; fi
}

# PG_TEMPLATE: an initdb'd cluster with an empty database "standin" (superuser "standin", trust
# authentication, no TCP), tuned for tests: no fsync (a stand-in's data need not survive a power cut).
pg_template() {
  local ver tmp
  ver=$("$PG_BIN/postgres" --version | awk '{print $3}')
  PG_TEMPLATE="$CACHE/standin-pgdata-$ver-r$PG_CONF_REV"
  [ -f "$PG_TEMPLATE/.complete" ] && return 0
  (
    flock 9
    [ -f "$PG_TEMPLATE/.complete" ] && exit 0
    log "creating the PostgreSQL $ver template cluster (once)"
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/awxto-pginit.XXXXXX")
    chmod 755 "$tmp"
    [ -z "$PG_USER" ] || chown "$PG_USER" "$tmp"
    as_pg "$PG_BIN/initdb" -D "$tmp/data" -U standin -A trust -E UTF8 --locale=C --no-sync >"$tmp/initdb.log" 2>&1 \
      || { rm -rf "$tmp"; exit 1; }
    cat >>"$tmp/data/postgresql.conf" <<'CONF'
# awx-token-operator stand-in
listen_addresses = ''
max_connections = 200
shared_buffers = 16MB
fsync = off
full_page_writes = off
log_min_messages = warning
log_line_prefix = '%m [%p] '
CONF
    echo "CREATE DATABASE standin;" | as_pg "$PG_BIN/postgres" --single -D "$tmp/data" postgres >>"$tmp/initdb.log" 2>&1 \
      || { rm -rf "$tmp"; exit 1; }
    rm -rf "$PG_TEMPLATE.tmp"
    cp -a "$tmp/data" "$PG_TEMPLATE.tmp"
    rm -rf "$tmp"
    touch "$PG_TEMPLATE.tmp/.complete"
    mv -T "$PG_TEMPLATE.tmp" "$PG_TEMPLATE"
  ) 9>"$CACHE/.standin-pgdata.lock" || die "initdb failed"
}

# The unprivileged server user must be able to reach RUN_DIR/pg: give search (x) permission on
# the directories above it that lack it (mktemp -d makes 0700 directories).
pg_reachable() {
  local d=$1
  [ -n "$PG_USER" ] || return 0
  runuser -u "$PG_USER" -- test -x "$d" 2>/dev/null && return 0
  while [ "$d" != / ]; do
    d=$(dirname "$d")
    runuser -u "$PG_USER" -- test -x "$d" 2>/dev/null || chmod o+x "$d"
  done
}

# pg_start RUN_DIR: start (creating it from the template if needed) the cluster of RUN_DIR; sets
# DB_HOST and DB_PORT for Django.
pg_start() {
  local run=$1 pg="$1/pg" opts port
  pg_template
  if [ ! -f "$pg/data/PG_VERSION" ]; then
    rm -rf "$pg"
    mkdir -p "$pg"
    cp -a "$PG_TEMPLATE" "$pg/data"
    rm -f "$pg/data/.complete"
    [ -z "$PG_USER" ] || chown -R "$PG_USER:" "$pg"
    chmod 700 "$pg" "$pg/data"
  fi
  pg_reachable "$pg"
  rm -f "$pg/host" "$pg/port"
  # A unix socket in RUN_DIR/pg, unless its path is too long for one (108 bytes): then loopback TCP.
  if [ "${#pg}" -le 90 ]; then
    DB_HOST=$pg DB_PORT=5432
    opts="-k $pg -p $DB_PORT -c listen_addresses="
  else
    DB_HOST=127.0.0.1 DB_PORT=$(free_port)
    opts="-k '' -p $DB_PORT -c listen_addresses=127.0.0.1"
  fi
  as_pg "$PG_BIN/pg_ctl" -D "$pg/data" -l "$pg/postgres.log" -w -t 60 -s -o "$opts" start >&2 \
    || { tail -n 20 "$pg/postgres.log" >&2 || true; die "PostgreSQL did not start in $pg"; }
  echo "$DB_HOST" >"$pg/host"
  echo "$DB_PORT" >"$pg/port"
}

pg_stop() {
  local pg="$1/pg"
  [ -f "$pg/data/postmaster.pid" ] || return 0
  find_pg || return 0
  [ "$(id -u)" != 0 ] || PG_USER=postgres
  # Immediate: like the web tier, the database goes down at once (it recovers on the next start).
  as_pg "$PG_BIN/pg_ctl" -D "$pg/data" -m immediate -w -t 30 -s stop >/dev/null 2>&1 || true
}

# Running, and not a zombie waiting for its (re)parent to reap it.
alive() {
  [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
  local st
  st=$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
  [ "$st" != Z ] && [ "$st" != X ]
}
# Only a process that is still our gunicorn (a stale pid file may name a reused pid).
ours() { alive "$1" && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -Eq 'gunicorn (standin|gateway)\.wsgi'; }

children_of() {
  local p=$1
  cat /proc/"$p"/task/*/children 2>/dev/null || true
}

stop_server() {
  local run=$1 pid kids k i
  if [ -f "$run/pid" ]; then
    pid=$(cat "$run/pid")
    if ours "$pid"; then
      kids=$(children_of "$pid")
      # Killed at once, master and worker: a stand-in for "AWX down" (open and hung requests just
      # lose their connection). Then its PostgreSQL goes down too; every commit is kept.
      kill -KILL "$pid" 2>/dev/null || true
      for k in $kids; do kill -KILL "$k" 2>/dev/null || true; done
      for i in $(seq 1 200); do alive "$pid" || break; sleep 0.02; done
      for k in $kids; do
        for i in $(seq 1 200); do alive "$k" || break; sleep 0.02; done
      done
    fi
    rm -f "$run/pid"
  fi
  pg_stop "$run"  # also when a start failed before the server ran
}

port_free() {
  python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

cmd_start() {
  [ $# -ge 1 ] || die "usage: standin.sh start RUN_DIR [--mode awx|gateway|generic] [--port N] [--tls-cert F --tls-key F] [--password-hash-iterations N]"
  local run=$1; shift
  local mode=awx port="" cert="" key="" iterations=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --mode) mode=$2; shift 2;;
      --mode=*) mode=${1#*=}; shift;;
      --port) port=$2; shift 2;;
      --port=*) port=${1#*=}; shift;;
      --password-hash-iterations) iterations=$2; shift 2;;
      --tls-cert) cert=$2; shift 2;;
      --tls-key) key=$2; shift 2;;
      *) die "unknown argument: $1";;
    esac
  done
  case "$mode" in awx|gateway|generic) ;; *) die "--mode must be awx, gateway or generic";; esac
  [ -z "$iterations" ] || [[ "$iterations" =~ ^[1-9][0-9]*$ ]] || die "--password-hash-iterations takes a positive integer"
  if [ -n "$cert$key" ] && { [ -z "$cert" ] || [ -z "$key" ]; }; then die "--tls-cert and --tls-key go together"; fi
  mkdir -p "$run"
  run="$(cd "$run" && pwd)"
  [ -z "$cert" ] || cert="$(cd "$(dirname "$cert")" && pwd)/$(basename "$cert")"
  [ -z "$key" ] || key="$(cd "$(dirname "$key")" && pwd)/$(basename "$key")"

  stop_server "$run"  # a restart on the same RUN_DIR keeps the DB
  use_venv "$mode"
  if [ -z "$port" ] && [ -f "$run/port" ] && port_free "$(cat "$run/port")"; then port=$(cat "$run/port"); fi
  [ -n "$port" ] || port=$(free_port)
  port_free "$port" || die "port $port on 127.0.0.1 is in use"

  ensure_venv
  ensure_pg
  # awx and generic share a schema; the gateway's is another: a run dir keeps the DB of one.
  local family=awx
  [ "$mode" != gateway ] || family=gateway
  if [ -d "$run/pg" ] && [ "$(cat "$run/pg/family" 2>/dev/null)" != "$family" ]; then
    log "$run/pg holds another flavour's database; starting from an empty one"
    rm -rf "$run/pg"
  fi
  pg_start "$run"
  echo "$family" >"$run/pg/family"
  local scheme=http tls=()
  if [ -n "$cert" ]; then scheme=https; tls=(--certfile "$cert" --keyfile "$key"); fi
  local url="$scheme://127.0.0.1:$port"

  local settings_module=standin.settings
  [ "$mode" != gateway ] || settings_module=gateway.settings
  export STANDIN_MODE=$mode STANDIN_RUN_DIR=$run DJANGO_SETTINGS_MODULE=$settings_module
  export STANDIN_DB_HOST=$DB_HOST STANDIN_DB_PORT=$DB_PORT
  # The default of the runtime setting password_hash_iterations (else Django's 600000).
  if [ -n "$iterations" ]; then
    export STANDIN_PASSWORD_HASH_ITERATIONS=$iterations
  else
    unset STANDIN_PASSWORD_HASH_ITERATIONS
  fi
  export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
  export STANDIN_MIGRATE=1  # the worker runs the migrations before it serves (standin/wsgi.py)
  # One worker process (in-memory faults and request log are shared), many threads; requests run
  # concurrently (each in its own DB transaction; password hashing releases the GIL).
  # The access log holds method, path (no query string) and status only.
  "$VENV/bin/gunicorn" "${settings_module%.settings}.wsgi:application" --chdir "$HERE" \
    --bind "127.0.0.1:$port" --workers 1 --worker-class gthread --threads 64 \
    --timeout 120 --graceful-timeout 2 --keep-alive 65 --backlog 512 "${tls[@]}" \
    --access-logfile "$run/access.log" --access-logformat '%(m)s %(U)s %(s)s' \
    --error-logfile "$run/server.log" --log-level info \
    </dev/null >>"$run/server.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$run/pid"
  echo "$port" >"$run/port"
  echo "$mode" >"$run/mode"
  echo "$url" >"$run/url"

  if ! "$VENV/bin/python" - "$url" "$pid" "$run" <<'EOF'
import json, os, ssl, sys, time, urllib.request
url, pid, run = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl._create_unverified_context()
deadline = time.time() + 60
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(1)
    try:
        with urllib.request.urlopen(url + "/_standin/health", timeout=2, context=ctx) as r:
            if r.status == 200 and json.load(r).get("run_dir") == run:  # not some other server
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.05)
sys.exit(1)
EOF
  then
    tail -n 30 "$run/server.log" >&2 || true
    stop_server "$run"
    rm -f "$run/url"
    die "the server did not answer at $url"
  fi
  log "$mode stand-in up at $url (pid $pid, run dir $run)"
  echo "$url"
}

cmd_stop() {
  [ $# -ge 1 ] || die "usage: standin.sh stop RUN_DIR"
  stop_server "$1"
}

cmd_test() {
  ensure_venv
  if ! "$VENV/bin/python" -c 'import pytest' 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$HERE/requirements-test.txt" >&2
  fi
  cd "$HERE"
  exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$HERE/test_standin.py" "$@"
}

case "${1:-}" in
  start) shift; cmd_start "$@";;
  stop) shift; cmd_stop "$@";;
  venv) use_venv "${2:-awx}"; ensure_venv; echo "$VENV";;
  test) shift; cmd_test "$@";;
  *) die "usage: standin.sh start RUN_DIR [--mode awx|gateway|generic] [--port N] [--tls-cert F --tls-key F] | stop RUN_DIR | venv | test [pytest args]";;
esac
