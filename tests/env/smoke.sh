#!/usr/bin/env bash
# Smoke test of the test environment itself:   tests/env/with-env.sh tests/env/smoke.sh
# Checks kubectl access, a CRD with status subresource, garbage collection of a dependent ConfigMap
# (owner: ConfigMap, then owner: custom resource after restart-kcm) and restart-apiserver.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"
: "${AWXTO_TEST_RUN_DIR:?run inside the environment: tests/env/with-env.sh $0}"

# gc_check OWNER_KIND OWNER_NAME OWNER_API_VERSION: a ConfigMap owned by it goes once it is deleted
gc_check() {
  local uid t0
  uid="$(kubectl get "$1" "$2" -o jsonpath='{.metadata.uid}')"
  kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: dependent-of-$2
  ownerReferences: [{apiVersion: $3, kind: $1, name: $2, uid: $uid}]
EOF
  t0="$(now)"
  kubectl delete "$1" "$2" --wait=false >/dev/null
  for _ in $(seq 300); do
    if ! kubectl get configmap "dependent-of-$2" >/dev/null 2>&1; then
      log "ok: dependent of $1/$2 collected $(since "$t0") after the owner's delete call"
      return 0
    fi
    sleep 0.1
  done
  die "dependent of $1/$2 still there after 30 s"
}

kubectl get ns
kubectl create configmap owner >/dev/null
gc_check ConfigMap owner v1

kubectl apply -f - >/dev/null <<'EOF'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  names: {kind: Widget, plural: widgets, singular: widget}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
          status: {type: object, x-kubernetes-preserve-unknown-fields: true}
EOF
kubectl wait --for=condition=Established crd/widgets.example.com >/dev/null
"$HERE/cluster.sh" restart-kcm "$AWXTO_TEST_RUN_DIR"   # so that its GC knows the new type
kubectl apply -f - >/dev/null <<'EOF'
apiVersion: example.com/v1
kind: Widget
metadata: {name: w1}
spec: {size: 3}
EOF
kubectl patch widget w1 --subresource=status --type=merge -p '{"status":{"ready":true}}' >/dev/null
[ "$(kubectl get widget w1 -o jsonpath='{.status.ready}')" = true ] || die "status subresource patch lost"
log "ok: custom resource with status subresource"
gc_check Widget w1 example.com/v1

"$HERE/cluster.sh" restart-apiserver "$AWXTO_TEST_RUN_DIR"
kubectl get widgets >/dev/null
kubectl create configmap owner2 >/dev/null
gc_check ConfigMap owner2 v1   # GC still works: kcm reconnected to the restarted apiserver
log "smoke test passed"
