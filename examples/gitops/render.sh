#!/usr/bin/env bash
# Re-render base/cumulo.yaml from charts/cumulo (run after changing the chart or its CRDs; a test fails when the
# committed file is stale). Rendered with cert-manager issuing the webhook's certificate: a chart-generated one
# would put a private key into git.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
helm=${HELM:-$("$repo/.venv/bin/python" -c 'from cumulo import toolchain; print(toolchain.binary("helm"))')}
{
  echo "# Rendered by examples/gitops/render.sh from charts/cumulo; do not edit (change the chart or an overlay)."
  "$helm" template cumulo "$repo/charts/cumulo" --namespace cumulo-system --include-crds \
    --set webhook.certificate.source=cert-manager
} > "$here/base/cumulo.yaml"
