#!/usr/bin/env bash
# Blixard's main job on one machine: set up (scripts/setup.sh), start a node on the embedded
# SQLite store, boot a real microVM (QEMU, the default guest image), show its status and the
# ready line from its serial console, then keep both running until Ctrl-C.
#   --once          delete the VM and stop the node after showing them (used by the tests)
# Environment: BLIXARD_DATA_DIR (default ./data), BLIXARD_API_PORT (default 7400),
# BLIXARD_GATEWAY_PORT (the function gateway, default 7480).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
once=0
[[ "${1:-}" == "--once" ]] && once=1

bash scripts/setup.sh

export BLIXARD_DATA_DIR="${BLIXARD_DATA_DIR:-$ROOT/data}"
export BLIXARD_API_PORT="${BLIXARD_API_PORT:-7400}"
url="http://127.0.0.1:$BLIXARD_API_PORT"

echo "quickstart: starting a Blixard node (data in $BLIXARD_DATA_DIR, API $url)"
.venv/bin/blixard node start &
node=$!
stop() { kill -TERM "$node" 2>/dev/null || true; wait "$node" 2>/dev/null || true; }
trap stop EXIT INT TERM

# Wait for the health check (at most 30 s), then show it.
health=""
for _ in $(seq 1 300); do
  if ! kill -0 "$node" 2>/dev/null; then
    wait "$node" || true
    echo "quickstart: the node exited before answering its health check" >&2
    trap - EXIT
    exit 1
  fi
  if health=$(.venv/bin/python - "$url/health" <<'PY'
import sys, httpx
try:
    r = httpx.get(sys.argv[1], timeout=1.0)
except httpx.HTTPError:
    sys.exit(1)
print(r.text)
sys.exit(0 if r.status_code == 200 else 1)
PY
  ); then
    break
  fi
  health=""
  sleep 0.1
done
if [[ -z "$health" ]]; then
  echo "quickstart: no healthy answer from $url/health within 30 s" >&2
  exit 1
fi
echo "quickstart: GET $url/health -> $health"

# The CLI finds this node's API and admin token through BLIXARD_DATA_DIR.
blixard=(.venv/bin/blixard)
vm="${QUICKSTART_VM:-demo}"
if "${blixard[@]}" vm status "$vm" >/dev/null 2>&1; then
  echo "quickstart: microVM $vm exists already (from an earlier run)"
else
  echo "quickstart: \$ blixard vm create $vm --image default --memory 256M"
  "${blixard[@]}" vm create "$vm" --image default --memory 256M
fi
echo "quickstart: \$ blixard vm list"
"${blixard[@]}" vm list
echo "quickstart: \$ blixard vm logs $vm   (the guest's serial console)"
"${blixard[@]}" vm logs "$vm" | tail -n 3

if ((once)); then
  echo "quickstart: deleting $vm and stopping the node (--once)"
  "${blixard[@]}" vm delete "$vm"
  exit 0
fi
echo "quickstart: the node and microVM $vm keep running; in another shell try"
echo "  BLIXARD_DATA_DIR=$BLIXARD_DATA_DIR .venv/bin/blixard vm list"
echo "quickstart: press Ctrl-C to stop the node (the VM keeps running and is re-attached next time)"
wait "$node"
