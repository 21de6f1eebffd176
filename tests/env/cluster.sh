#!/usr/bin/env bash
# A throwaway Kubernetes control plane on 127.0.0.1 for tests: etcd, kube-apiserver and
# kube-controller-manager on free ports, with their own PKI (openssl; EC P-256 keys, or RSA 2048
# with AWXTO_PKI_KEY=rsa). No containers, no kubelet.
#   cluster.sh start RUN_DIR              start it; writes RUN_DIR/kubeconfig (admin by client cert;
#                                         context test-token: admin by static token)
#   cluster.sh stop RUN_DIR               stop kcm, apiserver, etcd by recorded pid; idempotent
#   cluster.sh restart-apiserver RUN_DIR  restart kube-apiserver alone: same port, same flags
#   cluster.sh restart-kcm RUN_DIR        restart kube-controller-manager (its garbage collector
#                                         re-reads API discovery only every 30 s: do it after CRDs
#                                         are applied so owners of custom resources are collected)
# Binaries: the directory $AWXTO_KUBE_BIN, else kube-bin.sh's. Extra flags at start (word-split):
# $AWXTO_APISERVER_ARGS, $AWXTO_KCM_ARGS. Timings go to stderr.
# RUN_DIR holds pki/, etcd-data/, cluster.env (ports), NAME.args (the command line, one argument a
# line, reused on restart), NAME.pid, NAME.log (a restarted process's old log: NAME.log.N).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

[ $# = 2 ] || { sed -n '2,15s/^# \{0,1\}//p' "$0" >&2; exit 2; }
CMD="$1"
[ "$CMD" != start ] || mkdir -p "$2"
if [ ! -d "$2" ]; then
  [ "$CMD" = stop ] && exit 0
  die "no run dir $2"
fi
RUN_DIR="$(cd "$2" && pwd -P)"
P="$RUN_DIR/pki"

# ---- helpers --------------------------------------------------------------------------------
free_ports() {   # N distinct free loopback ports (held open together while chosen)
  python3 -c 'import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

minor_of() { "$1" --version 2>/dev/null | sed -n 's/^Kubernetes v1\.\([0-9]*\).*/\1/p' || true; }

write_args() { local name="$1"; shift; printf '%s\n' "$@" >"$RUN_DIR/$name.args"; }

launch() {   # launch NAME: run RUN_DIR/NAME.args in the background, logging to RUN_DIR/NAME.log
  local name="$1" n=1 args
  mapfile -t args <"$RUN_DIR/$name.args"
  if [ -e "$RUN_DIR/$name.log" ]; then
    while [ -e "$RUN_DIR/$name.log.$n" ]; do n=$((n + 1)); done
    mv "$RUN_DIR/$name.log" "$RUN_DIR/$name.log.$n"
  fi
  "${args[@]}" </dev/null >"$RUN_DIR/$name.log" 2>&1 &
  echo "$!" >"$RUN_DIR/$name.pid"
}

# stop NAME: SIGTERM, SIGKILL after 10 s; kube-apiserver after 2 s, as on SIGTERM it stops listening
# at once but then waits up to 60 s for open watches to end.
stop() { stop_pidfile "$RUN_DIR/$1.pid" "$RUN_DIR" "$([ "$1" = kube-apiserver ] && echo 2 || echo 10)"; }

wait_for() {   # wait_for NAME SECONDS CMD...: poll CMD every 0.1 s while NAME runs
  local name="$1" n=$(($2 * 10)) pid
  shift 2
  pid="$(cat "$RUN_DIR/$name.pid")"
  until "$@" >/dev/null 2>&1; do
    if ! alive "$pid" || [ "$((n -= 1))" -le 0 ]; then
      log "$name is not ready; end of $RUN_DIR/$name.log:"
      tail -n 20 "$RUN_DIR/$name.log" >&2
      return 1
    fi
    sleep 0.1
  done
}

api_get() { curl -sf --max-time 5 --cacert "$P/ca.crt" --cert "$P/admin.crt" --key "$P/admin.key" "$API_URL$1"; }
etcd_ok() { curl -sf --max-time 2 "http://127.0.0.1:$ETCD_PORT/health"; }
kcm_healthy() { curl -skf --max-time 2 "https://127.0.0.1:$KCM_PORT/healthz"; }
# GC informers synced and the default ServiceAccount exists (up to 1.23: with its token Secret)
kcm_synced() {
  grep -qi 'resource monitors have synced' "$RUN_DIR/kube-controller-manager.log" &&
    api_get /api/v1/namespaces/default/serviceaccounts/default | grep -q "$SA_READY"
}

wait_apiserver() { wait_for kube-apiserver 120 api_get /readyz; }
wait_kcm() {   # prints "healthz T1, synced T2" relative to $1
  wait_for kube-controller-manager 60 kcm_healthy
  printf 'healthz %s, ' "$(since "$1")"
  wait_for kube-controller-manager 60 kcm_synced
  printf 'GC synced + default SA %s' "$(since "$1")"
}

make_pki() {
  mkdir -p "$P"
  (
    cd "$P"
    for k in ca apiserver admin kcm sa; do
      if [ "${AWXTO_PKI_KEY:-ec}" = rsa ]; then openssl genrsa -out "$k.key" 2048 2>/dev/null &
      else openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$k.key"; fi
    done
    wait
    openssl req -x509 -new -key ca.key -days 3650 -sha256 -subj /CN=awxto-test-ca -out ca.crt
    printf '%s\n' basicConstraints=CA:FALSE keyUsage=digitalSignature,keyEncipherment \
      extendedKeyUsage=serverAuth "subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,\
DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.0.0.1" >server.ext
    printf '%s\n' basicConstraints=CA:FALSE keyUsage=digitalSignature,keyEncipherment \
      extendedKeyUsage=clientAuth >client.ext
    sign() {   # sign NAME SUBJECT EXTFILE
      openssl req -new -key "$1.key" -subj "$2" |
        openssl x509 -req -CA ca.crt -CAkey ca.key -set_serial "0x$(openssl rand -hex 8)" \
          -days 3650 -sha256 -extfile "$3" -out "$1.crt" 2>/dev/null
    }
    sign apiserver /CN=kube-apiserver server.ext
    sign admin /O=system:masters/CN=admin client.ext
    sign kcm /O=system:masters/CN=system:kube-controller-manager client.ext
    openssl pkey -in sa.key -pubout -out sa.pub
    echo "$(openssl rand -hex 16),admin-token,1000,\"system:masters\"" >tokens.csv
  )
}

write_kubeconfig() {   # write_kubeconfig FILE USER(cert name)
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: $API_URL
    certificate-authority: $P/ca.crt
users:
- name: $2
  user:
    client-certificate: $P/$2.crt
    client-key: $P/$2.key
- name: admin-token
  user:
    token: $(cut -d, -f1 "$P/tokens.csv")
contexts:
- name: test
  context: {cluster: test, user: $2}
- name: test-token
  context: {cluster: test, user: admin-token}
current-context: test
EOF
}

stop_all() { local name; for name in kube-controller-manager kube-apiserver etcd; do stop "$name"; done; }
stop_on_failure() { [ "$1" = 0 ] || { log "start failed; stopping what was started"; stop_all; }; }

# ---- commands -------------------------------------------------------------------------------
start() {
  local t0 bin extra api_minor kcm_minor
  t0="$(now)"
  [ ! -e "$RUN_DIR/kube-apiserver.pid" ] || die "a cluster is recorded in $RUN_DIR; stop it first"
  rm -rf "$RUN_DIR/etcd-data" "$P"   # a stopped cluster's state: start afresh
  trap 'stop_on_failure $?' EXIT
  if [ -n "${AWXTO_KUBE_BIN:-}" ]; then bin="$AWXTO_KUBE_BIN"; else bin="$("$HERE/kube-bin.sh" | tail -n 1)"; fi
  api_minor="$(minor_of "$bin/kube-apiserver")"
  kcm_minor="$(minor_of "$bin/kube-controller-manager")"
  read -r API_PORT ETCD_PORT PEER_PORT KCM_PORT < <(free_ports 4)
  printf '%s\n' "API_PORT=$API_PORT" "ETCD_PORT=$ETCD_PORT" "PEER_PORT=$PEER_PORT" "KCM_PORT=$KCM_PORT" \
    "KCM_MINOR=$kcm_minor" >"$RUN_DIR/cluster.env"
  load_env
  chmod 700 "$RUN_DIR"
  make_pki
  write_kubeconfig "$RUN_DIR/kubeconfig" admin
  write_kubeconfig "$RUN_DIR/kcm.kubeconfig" kcm
  local t_pki; t_pki="$(since "$t0")"

  write_args etcd "$bin/etcd" --name test --data-dir "$RUN_DIR/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
    --initial-cluster "test=http://127.0.0.1:$PEER_PORT" --unsafe-no-fsync
  read -ra extra <<<"${AWXTO_APISERVER_ARGS:-}"
  # shellcheck disable=SC2046  # the version-dependent flag is empty or one word
  write_args kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
    --secure-port="$API_PORT" $([ "${api_minor:-99}" -ge 24 ] || echo --insecure-port=0) --cert-dir="$P" \
    --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
    --client-ca-file="$P/ca.crt" --token-auth-file="$P/tokens.csv" \
    --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --api-audiences=https://kubernetes.default.svc.cluster.local \
    --authorization-mode=RBAC --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true \
    --enable-priority-and-fairness=false --endpoint-reconciler-type=none "${extra[@]}"
  read -ra extra <<<"${AWXTO_KCM_ARGS:-}"
  # shellcheck disable=SC2046
  write_args kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig="$RUN_DIR/kcm.kubeconfig" --bind-address=127.0.0.1 --secure-port="$KCM_PORT" \
    $([ "${kcm_minor:-99}" -ge 24 ] || echo --port=0) --leader-elect=false --controllers='*' \
    --service-account-private-key-file="$P/sa.key" --root-ca-file="$P/ca.crt" \
    --cluster-signing-cert-file="$P/ca.crt" --cluster-signing-key-file="$P/ca.key" \
    --use-service-account-credentials=false --v=2 "${extra[@]}"

  launch etcd
  wait_for etcd 30 etcd_ok
  local t_etcd; t_etcd="$(since "$t0")"
  launch kube-apiserver
  wait_apiserver
  local t_api; t_api="$(since "$t0")"
  launch kube-controller-manager
  local t_kcm; t_kcm="$(wait_kcm "$t0")"
  trap - EXIT
  log "cluster up at $API_URL in $(since "$t0"): pki $t_pki, etcd $t_etcd, apiserver ready $t_api, kcm $t_kcm"
  echo "export KUBECONFIG=$RUN_DIR/kubeconfig"
}

load_env() {
  [ -f "$RUN_DIR/cluster.env" ] || die "no cluster in $RUN_DIR"
  # shellcheck source=/dev/null
  . "$RUN_DIR/cluster.env"
  API_URL="https://127.0.0.1:$API_PORT"
  if [ "${KCM_MINOR:-99}" -ge 24 ]; then SA_READY='"uid"'; else SA_READY='"secrets"'; fi
}

case "$CMD" in
  start) start ;;
  stop)
    t0="$(now)"
    stop_all
    log "stopped in $(since "$t0")"
    ;;
  restart-apiserver)
    load_env
    t0="$(now)"
    stop kube-apiserver
    t_stop="$(since "$t0")"
    launch kube-apiserver
    wait_apiserver
    log "kube-apiserver restarted on port $API_PORT in $(since "$t0") (stop $t_stop)"
    ;;
  restart-kcm)
    load_env
    t0="$(now)"
    stop kube-controller-manager
    launch kube-controller-manager
    t_kcm="$(wait_kcm "$t0")"
    log "kube-controller-manager restarted: $t_kcm"
    ;;
  *) die "unknown command $CMD (start, stop, restart-apiserver, restart-kcm)" ;;
esac
