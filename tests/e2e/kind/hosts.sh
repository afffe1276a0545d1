#!/usr/bin/env bash
# The simulator quickstart's per-node objects: for each node named on the command line, its Host in cluster1 (its
# agent registers it too; created here so the pool can name it) and its local primary storage pool.
set -euo pipefail
for node in "$@"; do
  cat <<MANIFEST
---
apiVersion: cumulo.io/v1alpha1
kind: Host
metadata: {name: $node}
spec: {cluster: cluster1}
---
apiVersion: cumulo.io/v1alpha1
kind: StoragePool
metadata: {name: $node-local}
spec: {zone: zone1, scope: Host, type: Filesystem, host: $node, path: /var/lib/cumulo/pools/$node-local, tags: [local]}
MANIFEST
done
