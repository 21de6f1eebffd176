#!/usr/bin/env bash
# Local demo from nothing: a test cluster (kube-apiserver + controller-manager on loopback), an AWX
# stand-in with a demo user and OAuth2 application, the operator, and an example AwxToken. Ends by
# printing the AwxToken and the Secret the operator wrote. Stop it all with demo/down.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEMO="${AWXTO_DEMO_DIR:-/tmp/awx-token-operator-demo}"
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

[ -d "$DEMO" ] && "$ROOT/tests/env/down.sh" "$DEMO" >/dev/null 2>&1 || true
rm -rf "$DEMO"; mkdir -p "$DEMO/operator"

say "building the operator"
(cd "$ROOT" && cargo build --quiet --bin awx-token-operator)
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/awx-token-operator"

say "starting the test cluster (first run builds kube-apiserver from Debian's source: ~6 min)"
"$ROOT/tests/env/up.sh" "$DEMO"
# shellcheck source=/dev/null
. "$DEMO/env.sh"

say "starting the AWX stand-in (AWX 24.6.1's OAuth2 stack) with user demo-bot and an application"
AWX="$("$ROOT/tests/awx-standin/standin.sh" start "$DEMO/awx" --mode awx | tail -n 1)"
curl -sf -X POST "$AWX/_standin/users" -H 'content-type: application/json' \
  -d '{"username": "demo-bot", "password": "demo-password"}' >/dev/null
APP="$(curl -sf -X POST "$AWX/_standin/applications" -H 'content-type: application/json' \
  -d '{"name": "awx-token-operator-demo", "client_type": "confidential", "grant_type": "password", "user": "demo-bot"}')"
CLIENT_ID="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["client_id"])' <<<"$APP")"
CLIENT_SECRET="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["client_secret"])' <<<"$APP")"

say "installing the CRDs and starting the operator (log: $DEMO/operator/log)"
"$BIN" crd --without-cel | kubectl apply -f - >/dev/null   # the test cluster is Kubernetes 1.20: no CEL
for kind in cluster-awx-connection awx-connection; do
  "$BIN" connection-crd "$kind" --without-cel | kubectl apply -f - >/dev/null
done
kubectl wait --for=condition=Established crd/awxtokens.awx-token-operator.io \
  crd/clusterawxconnections.awx-token-operator.io crd/awxconnections.awx-token-operator.io \
  --timeout=30s >/dev/null
"$ROOT/tests/env/cluster.sh" restart-kcm "$DEMO" >/dev/null 2>&1
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
setsid "$BIN" run --http-addr "127.0.0.1:$PORT" >"$DEMO/operator/log" 2>&1 </dev/null &
echo $! >"$DEMO/operator/pid"

say "applying the example: credentials Secret + AwxToken ci-bot in namespace demo"
kubectl create namespace demo >/dev/null
kubectl apply -f - <<YAML
apiVersion: v1
kind: Secret
metadata: {name: awx-bot, namespace: demo}
stringData:
  username: demo-bot
  password: demo-password
  client_id: "$CLIENT_ID"
  client_secret: "$CLIENT_SECRET"
---
apiVersion: awx-token-operator.io/v1alpha1
kind: AwxToken
metadata: {name: ci-bot, namespace: demo}
spec:
  awx:
    url: $AWX
    allowInsecureHttp: true      # the stand-in speaks plain http on loopback
  grant:
    type: Password
    credentialsSecretRef: {name: awx-bot}
  renewal:
    rotateEvery: 10m
    revokeGracePeriod: 1m
YAML
kubectl wait --for=condition=Ready awxt/ci-bot -n demo --timeout=90s >/dev/null

say "kubectl get awxt -n demo"
kubectl get awxt -n demo
say "kubectl get secret ci-bot -n demo -o yaml"
kubectl get secret ci-bot -n demo -o yaml
say "decoded: the token works against AWX's /api/v2/me/"
TOKEN="$(kubectl get secret ci-bot -n demo -o jsonpath='{.data.token}' | base64 -d)"
echo "host:  $(kubectl get secret ci-bot -n demo -o jsonpath='{.data.host}' | base64 -d)"
echo "token: $TOKEN"
curl -sf -H "Authorization: Bearer $TOKEN" "$AWX/api/v2/me/" | python3 -c 'import json,sys; print("AWX says you are:", json.load(sys.stdin)["results"][0]["username"])'
cat <<MSG

The demo keeps running. Try:
  export KUBECONFIG=$DEMO/kubeconfig PATH=$AWXTO_TOOLS_BIN:\$PATH
  kubectl annotate awxt ci-bot -n demo awx-token-operator.io/rotate=\$(date +%s)   # rotate now
  kubectl describe awxt ci-bot -n demo
  curl -s 127.0.0.1:$PORT/metrics | grep awx_token_operator_tokens
Stop everything with: demo/down.sh
MSG
