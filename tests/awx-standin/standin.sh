#!/usr/bin/env bash
# AWX stand-in for end-to-end tests (see README.md).
#
#   standin.sh start RUN_DIR [--mode awx|gateway|generic] [--port N] [--tls-cert F --tls-key F]
#       prints the base URL as its last stdout line; writes RUN_DIR/{pid,port,url,mode}
#   standin.sh stop RUN_DIR
#   standin.sh venv            create the virtualenv if needed, print its path
#   standin.sh test [ARGS]     run test_standin.py with pytest (installed into the venv)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${AWXTO_CACHE:-$HOME/.cache/awx-token-operator}"
REQ="$HERE/requirements.txt"
VENV="$CACHE/standin-venv-$(sha256sum "$REQ" | cut -c1-12)"

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
    ) 9>"$CACHE/.standin-venv.lock"
  else
    make_venv
  fi
  [ -f "$VENV/.complete" ] || die "virtualenv $VENV was not created"
}

# Running, and not a zombie waiting for its (re)parent to reap it.
alive() {
  [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
  local st
  st=$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
  [ "$st" != Z ] && [ "$st" != X ]
}
# Only a process that is still our gunicorn (a stale pid file may name a reused pid).
ours() { alive "$1" && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q 'gunicorn standin.wsgi'; }

children_of() {
  local p=$1
  cat /proc/"$p"/task/*/children 2>/dev/null || true
}

stop_server() {
  local run=$1 pid kids k i
  [ -f "$run/pid" ] || return 0
  pid=$(cat "$run/pid")
  if ours "$pid"; then
    kids=$(children_of "$pid")
    # Killed at once, master and worker: a stand-in for "AWX down" (open and hung requests just
    # lose their connection). Nothing is lost: sqlite in WAL mode keeps every commit.
    kill -KILL "$pid" 2>/dev/null || true
    for k in $kids; do kill -KILL "$k" 2>/dev/null || true; done
    for i in $(seq 1 200); do alive "$pid" || break; sleep 0.02; done
    for k in $kids; do
      for i in $(seq 1 200); do alive "$k" || break; sleep 0.02; done
    done
  fi
  rm -f "$run/pid"
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
  [ $# -ge 1 ] || die "usage: standin.sh start RUN_DIR [--mode awx|gateway|generic] [--port N] [--tls-cert F --tls-key F]"
  local run=$1; shift
  local mode=awx port="" cert="" key=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --mode) mode=$2; shift 2;;
      --mode=*) mode=${1#*=}; shift;;
      --port) port=$2; shift 2;;
      --port=*) port=${1#*=}; shift;;
      --tls-cert) cert=$2; shift 2;;
      --tls-key) key=$2; shift 2;;
      *) die "unknown argument: $1";;
    esac
  done
  case "$mode" in awx|gateway|generic) ;; *) die "--mode must be awx, gateway or generic";; esac
  if [ -n "$cert$key" ] && { [ -z "$cert" ] || [ -z "$key" ]; }; then die "--tls-cert and --tls-key go together"; fi
  mkdir -p "$run"
  run="$(cd "$run" && pwd)"
  [ -z "$cert" ] || cert="$(cd "$(dirname "$cert")" && pwd)/$(basename "$cert")"
  [ -z "$key" ] || key="$(cd "$(dirname "$key")" && pwd)/$(basename "$key")"

  stop_server "$run"  # a restart on the same RUN_DIR keeps the DB
  if [ -z "$port" ] && [ -f "$run/port" ] && port_free "$(cat "$run/port")"; then port=$(cat "$run/port"); fi
  [ -n "$port" ] || port=$(free_port)
  port_free "$port" || die "port $port on 127.0.0.1 is in use"

  ensure_venv
  local scheme=http tls=()
  if [ -n "$cert" ]; then scheme=https; tls=(--certfile "$cert" --keyfile "$key"); fi
  local url="$scheme://127.0.0.1:$port"

  export STANDIN_MODE=$mode STANDIN_RUN_DIR=$run DJANGO_SETTINGS_MODULE=standin.settings
  export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
  export STANDIN_MIGRATE=1  # the worker runs the migrations before it serves (standin/wsgi.py)
  # One worker process (in-memory faults and request log are shared), many threads.
  # The access log holds method, path (no query string) and status only.
  "$VENV/bin/gunicorn" standin.wsgi:application --chdir "$HERE" \
    --bind "127.0.0.1:$port" --workers 1 --worker-class gthread --threads 64 \
    --timeout 120 --graceful-timeout 2 --keep-alive 5 --backlog 512 "${tls[@]}" \
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
  venv) ensure_venv; echo "$VENV";;
  test) shift; cmd_test "$@";;
  *) die "usage: standin.sh start RUN_DIR [--mode awx|gateway|generic] [--port N] [--tls-cert F --tls-key F] | stop RUN_DIR | venv | test [pytest args]";;
esac
