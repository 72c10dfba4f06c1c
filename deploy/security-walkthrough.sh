#!/usr/bin/env bash
# The security walkthrough of issue #5: enrol -> join -> revoke -> refused, then tamper -> audit verify fails.
# Real CLI commands and a real coordinator on 127.0.0.1 with mTLS. Usage: bash deploy/security-walkthrough.sh [WORKDIR]
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash deploy/setup.sh >/dev/null
PY=.venv/bin/python
A=${1:-$(mktemp -d -t fedbridge-walkthrough-XXXX)}; rm -rf "$A/fed" "$A/fed-ca" "$A/kit"; mkdir -p "$A"; echo "# work dir: $A"
BASE=$($PY -c "from sandbox.tiny_model import build_tiny_model; print(build_tiny_model())")
echo "\$ fedbridge-admin init --dir FED --federation-id acceptance --base-model TINY --host localhost --host 127.0.0.1 --listen 127.0.0.1:0"
$PY -m coordinator init --dir $A/fed --federation-id acceptance --base-model $BASE --host localhost --host 127.0.0.1 --listen 127.0.0.1:0 2>&1 | tail -4
echo "\$ fedbridge-site init --dir KIT --name hospital-a        # on the site: its keys never leave it"
$PY -m site_agent init --dir $A/kit --name hospital-a 2>&1 | tail -2
echo "\$ fedbridge-admin enroll-site --csr KIT/client.csr --region EU-DE --fed-dir FED --out BUNDLE"
$PY -m coordinator enroll-site --csr $A/kit/client.csr --region EU-DE --fed-dir $A/fed --out $A/bundle.json 2>&1 | tail -2
echo "\$ fedbridge-site install-bundle --dir KIT --bundle BUNDLE"
$PY -m site_agent install-bundle --dir $A/kit --bundle $A/bundle.json 2>&1 | tail -2
$PY -m coordinator serve -c $A/fed/federation.toml > $A/coord.log 2>&1 &
CP=$!
trap 'kill -TERM $CP 2>/dev/null' EXIT
while [ ! -f $A/fed/state/coordinator.port ]; do sleep 0.2; done
PORT=$(cat $A/fed/state/coordinator.port)
join() {
$PY - "$A/kit" "$PORT" <<'PYEOF'
import sys, grpc
from pathlib import Path
from protos.fedbridge.v1 import federation_service_pb2 as pb, federation_service_pb2_grpc as g
kit, port = Path(sys.argv[1]), sys.argv[2]
cred = grpc.ssl_channel_credentials((kit/"ca.pem").read_bytes(), (kit/"client.key").read_bytes(), (kit/"client.pem").read_bytes())
with grpc.secure_channel(f"127.0.0.1:{port}", cred, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
    try:
        r = g.FederationServiceStub(ch).Join(pb.JoinRequest(agent_version="fedbridge-site/0.1.0"), timeout=20)
        print(f"Join OK: site={r.site} federation={r.federation_id}")
    except grpc.RpcError as e:
        print(f"Join refused: {e.code().name}: {e.details()}")
PYEOF
}
echo "# site hospital-a joins over mTLS with its kit"; join
echo "\$ fedbridge-admin revoke-site hospital-a --fed-dir FED --reason 'key leaked'"
$PY -m coordinator revoke-site hospital-a --fed-dir $A/fed --reason "key leaked" 2>&1 | tail -1
sleep 1.5
echo "# the same site calls again"; join
kill -TERM $CP; wait $CP 2>/dev/null
trap - EXIT
echo "\$ fedbridge-admin audit verify --state-dir FED/state"
$PY -m coordinator audit verify --state-dir $A/fed/state 2>&1 | tail -3; echo "exit=${PIPESTATUS[0]}"
echo "# tamper: change the reason recorded on the revocation line"
sed -i 's/key leaked/routine rotation/' $A/fed/state/audit.jsonl
$PY -m coordinator audit verify --state-dir $A/fed/state 2>&1 | tail -3; echo "exit=${PIPESTATUS[0]}"
