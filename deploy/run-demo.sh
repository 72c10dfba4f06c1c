#!/usr/bin/env bash
# Set up (first run only; re-runs are free) and run the demo: a coordinator and 3 site agents on loopback with mTLS.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/deploy/setup.sh"
cd "$root"
exec "$root/.venv/bin/fedbridge" demo "$@"
