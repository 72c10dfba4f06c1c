#!/usr/bin/env bash
# Set up fedbridge from nothing: a .venv with torch 2.13.0 (CPU wheel) installed FIRST, then the project and its
# extras. Re-running is free: a stamp of the inputs' hash skips the install when nothing changed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
PY=${PYTHON:-python3}
VENV=${FEDBRIDGE_VENV:-$root/.venv}
EXTRAS=${FEDBRIDGE_EXTRAS:-site,eval,dev}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# The dashboard's real-browser test (dev extra) drives Debian's chromium through Playwright; Playwright's own browser
# download cannot work offline, so the system package is used. Checked before the stamp: a fresh machine may reuse a venv.
if [[ ",$EXTRAS," == *",dev,"* ]] && [ ! -x /usr/bin/chromium ]; then
  echo "[setup] installing chromium (Debian package) for the dashboard browser test"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi
# The deployment-kit test verifies the systemd units with systemd-analyze (Debian's systemd package).
if [[ ",$EXTRAS," == *",dev,"* ]] && ! command -v systemd-analyze >/dev/null; then
  echo "[setup] installing systemd (Debian package) for systemd-analyze"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends systemd
fi
# The multi-host test (tests/deploy/test_netns.py) firewalls its network namespaces with iptables. Only as root with
# apt-get: elsewhere that test skips, saying why.
if [[ ",$EXTRAS," == *",dev,"* ]] && ! command -v iptables >/dev/null && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] installing iptables (Debian package) for the network-namespace test"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iptables >/dev/null
fi
# The clock-skew fault case (tests/faults/test_clock_skew.py) runs a site under libfaketime; it skips without it.
if [[ ",$EXTRAS," == *",dev,"* ]] && ! ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] \
    && command -v apt-get >/dev/null; then
  echo "[setup] installing faketime (Debian package) for the clock-skew fault case"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends faketime >/dev/null
fi
stamp="$VENV/.fedbridge-setup"
want=$(cat pyproject.toml deploy/setup.sh deploy/kit-validators.txt | sha256sum | cut -c1-32)-$EXTRAS
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
# 1. torch first: a bare `torch` requirement with no torch installed pulls a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU)"
  "${pip[@]}" install -q "torch==2.13.0"
fi
# 2. the project and its extras. DeepSpeed must not try to compile its CUDA ops.
echo "[setup] installing fedbridge[$EXTRAS]"
DS_BUILD_OPS=0 "${pip[@]}" install -q -e ".[$EXTRAS]"
# 3. the deployment kits' validators (pinned; schemas and binaries ship inside the packages).
if [[ ",$EXTRAS," == *",dev,"* ]]; then
  echo "[setup] installing the deployment-kit validators"
  "${pip[@]}" install -q -r deploy/kit-validators.txt
fi
"${pip[@]}" check
echo "$want" > "$stamp"
echo "[setup] ready: $VENV"
