"""The cross-border link: one site uploads and downloads an 80 MiB adapter over a shaped WAN link, and resumes an
upload across a 30 s cut.

The link (:mod:`bench.linkemu`): 50 Mbit/s each way, 150 ms RTT, 0.5 % random loss each way, between two network
namespaces; kernel netem where the kernel has it, else the userspace TUN emulator (the output says which ran). The
coordinator runs in one namespace, the site in the other, both as real processes with mutual TLS.

The adapter: LoRA r=16 on every linear layer of a Llama-3-8B-shaped base (hidden 4096, MLP 14336, 32 layers,
32 query / 8 KV heads) in bf16: 32 × (q 16·(4096+4096) + k, v 16·(4096+1024) + o 16·(4096+4096) + gate, up, down
16·(4096+14336)) = 41 943 040 parameters = 80 MiB. The base is config-only (the coordinator builds the adapter
spec on the meta device and never reads base weights), so no 16 GB of weights are needed.

One round, two sites one after the other: each downloads the global adapter (the real DownloadAdapter stream) and
uploads its signed delta (the real UploadUpdate stream). For the second, the link is cut for 30 s once 40 % of its
upload has been handed to gRPC; the site client's own retry and resume (GetUploadStatus, then UploadUpdate from
the acknowledged offset) finishes it.

Rows: goodput / the link's rate, each way (goal ≥ 0.85), with a raw-TCP transfer of the same size through the same
link as the informational reference; t(cut upload) / (t(uncut upload) + 30 s) (goal ≤ 1.1); and the emulator's
own capacity (unshaped raw TCP through it), which must be well above the link's rate for the rows to mean anything.

Run as root: ``python -m bench.link`` (about 3 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.linkemu import COORD_IP, TunLink, make_link  # noqa: E402
from bench.report import Row, write_results  # noqa: E402

RATE_BPS, RTT_S, LOSS = 50e6, 0.150, 0.005
CUT_S, CUT_AT = 30.0, 0.4
GOODPUT_GOAL, CUT_GOAL = 0.85, 1.1
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
            "tie_word_embeddings": False, "hidden_act": "silu"}
TCP_PORT = 5201
# Two sites in the one round (quorum: both): the first uploads over the intact link, the second is cut mid-upload.
# One round, because closing it aggregates and at these shapes that takes minutes on 2 cores.
SITES = ("site-eu", "site-eu-cut")
PY = sys.executable


# -- raw TCP reference (each end runs in its namespace) ----------------------------------------------------------
def tcp_server(port: int, mode: str, nbytes: int) -> None:
    """One transfer: ``up`` reads ``nbytes`` then answers one byte; ``down`` sends ``nbytes`` after one byte."""
    srv = socket.create_server(("0.0.0.0", port))
    print("ready", flush=True)
    conn, _ = srv.accept()
    buf = memoryview(bytearray(1 << 20))
    if mode == "up":
        got = 0
        while got < nbytes:
            n = conn.recv_into(buf)
            if not n:
                break
            got += n
        conn.sendall(b"k")
    else:
        conn.recv(1)
        block, left = bytes(1 << 20), nbytes
        while left:
            conn.sendall(block[:min(left, len(block))])
            left -= min(left, len(block))
    conn.close()


def tcp_client(host: str, port: int, mode: str, nbytes: int) -> None:
    t0 = time.monotonic()
    conn = socket.create_connection((host, port), timeout=300)
    if mode == "up":
        block, left = bytes(1 << 20), nbytes
        while left:
            conn.sendall(block[:min(left, len(block))])
            left -= min(left, len(block))
        assert conn.recv(1) == b"k"
    else:
        conn.sendall(b"g")
        buf, got = memoryview(bytearray(1 << 20)), 0
        while got < nbytes:
            n = conn.recv_into(buf)
            if not n:
                break
            got += n
        assert got == nbytes, got
    print(json.dumps({"seconds": time.monotonic() - t0}), flush=True)


def raw_tcp(link: Any, mode: str, nbytes: int) -> float:
    """Seconds for one raw TCP transfer site -> coordinator (``up``) or back (``down``), connection setup included."""
    me = [PY, "-m", "bench.link"]
    srv = subprocess.Popen(link.exec_in("coord") + me + ["--tcp-server", str(TCP_PORT), mode, str(nbytes)], cwd=ROOT,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        out = subprocess.run(link.exec_in("site") + me + ["--tcp-client", COORD_IP, str(TCP_PORT), mode, str(nbytes)],
                             cwd=ROOT, capture_output=True, text=True, timeout=600, check=True).stdout
        return float(json.loads(out.strip().splitlines()[-1])["seconds"])
    finally:
        srv.wait(30)


# -- the site (runs in the site namespace) -----------------------------------------------------------------------
def site_main(spec_path: Path) -> None:
    """One site, round 1: download the global adapter, then upload a signed delta; with ``cut`` in the spec it prints
    ``cut`` once CUT_AT of the payload went to gRPC (the parent cuts the link), and always the JSON timings last."""
    import torch
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from fedcommon import tensors
    from protos import codec
    from protos.fedbridge.v1 import federation_service_pb2 as pb
    from site_agent.client import CoordinatorClient
    from site_agent.config import SiteConfig, SiteData, SiteTls

    spec = json.loads(spec_path.read_text())
    kit = Path(spec["kit"])
    cfg = SiteConfig(name=spec["name"], coordinator=spec["coordinator"], base_model=kit, work_dir=kit,
                     tls=SiteTls(kit / "ca.pem", kit / "client.pem", kit / "client.key", kit / "signing.key"),
                     data=SiteData(kit / "unused.jsonl"), server_name="localhost", fetch_wait_ms=5_000,
                     retry_for_s=600)
    key = load_pem_private_key(cfg.tls.signing_key.read_bytes(), password=None)
    client = CoordinatorClient(cfg)
    client.join("bench-link", 0)
    while True:
        resp = client.fetch_task(cfg.fetch_wait_ms)
        if resp.status == pb.TASK_STATUS_TRAIN:
            break
    task = resp.task
    t0 = time.monotonic()
    client.download_adapter(task.round, task.global_adapter_sha256, task.global_adapter_size)
    t_down = time.monotonic() - t0
    g = torch.Generator().manual_seed(len(cfg.name))
    payload = tensors.encode_state({t.name: (torch.randn(*t.shape, generator=g) * 1e-3).to(torch.bfloat16)
                                    for t in task.adapter_spec.tensors})
    env = codec.make_envelope(federation_id=task.federation_id, round=task.round, site=cfg.name,
                              base_model_sha256=task.base_model_sha256, payload=payload,
                              adapter_spec_sha256=task.adapter_spec.sha256, num_examples=10)
    signed = codec.sign_envelope(env, key)  # type: ignore[arg-type]
    told = threading.Event()

    def progress(sent: int) -> None:
        if spec["cut"] and not told.is_set() and sent >= CUT_AT * len(payload):
            told.set()
            print("cut", flush=True)

    t0 = time.monotonic()
    client.upload(signed, env, payload, on_progress=progress)
    t_up = time.monotonic() - t0
    client.close()
    print(json.dumps({"download_s": t_down, "download_bytes": task.global_adapter_size, "upload_s": t_up,
                      "upload_bytes": len(payload),
                      "tensor_bytes": sum(2 * _numel(t.shape) for t in task.adapter_spec.tensors)}), flush=True)


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# -- the federation ----------------------------------------------------------------------------------------------
def llama8b_base(out: Path) -> Path:
    """A config-only Llama-3-8B-shaped base with the house tiny model's tokenizer (see the module docstring)."""
    import shutil

    from fedcommon.manifest import Manifest
    from sandbox.tiny_model import build_tiny_model

    tiny = build_tiny_model()
    out.mkdir(parents=True, exist_ok=True)
    tok = json.loads((tiny / "config.json").read_text())
    cfg = {**LLAMA_8B, "vocab_size": tok["vocab_size"], "bos_token_id": tok.get("bos_token_id"),
           "eos_token_id": tok.get("eos_token_id"), "pad_token_id": tok.get("pad_token_id")}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, out / name)
    Manifest.of_dir(out).save(out)
    return out


def start_coordinator(link: Any, root: Path) -> tuple[subprocess.Popen, int, dict[str, Path]]:
    from coordinator.trust.pki import create_dev_pki
    from fedcommon.tomlconfig import dumps

    base = llama8b_base(root / "base")
    pki = create_dev_pki(root / "pki", list(SITES), hosts=("localhost", COORD_IP))
    state = root / "state"
    cfg = {"federation_id": "link", "base_model": str(base), "base_model_ref": "bench/llama-8b-shapes", "rounds": 1,
           "min_sites": len(SITES), "listen": f"{COORD_IP}:0", "state_dir": str(state), "registry_dir": str(root / "published"),
           "exit_when_done": False, "tls": {"ca": str(pki.ca_cert), "cert": str(pki.server_cert),
                                            "key": str(pki.server_key)},
           "dashboard": {"enabled": False},
           "lora": {"rank": 16, "alpha": 32.0, "target_modules": ["all-linear"], "wire_dtype": "bfloat16"}}
    toml = root / "federation.toml"
    toml.write_text(dumps(cfg))
    log = open(root / "coordinator.log", "ab")  # noqa: SIM115 - lives as long as the process
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(link.exec_in("coord") + [PY, "-m", "coordinator", "serve", "--config", str(toml)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    port_file = state / "coordinator.port"
    deadline = time.monotonic() + 300
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("coordinator did not start:\n" + (root / "coordinator.log").read_text()[-3000:])
        time.sleep(0.2)
    return proc, int(port_file.read_text()), {n: pki.sites[n].dir for n in SITES}


def run_site(link: Any, root: Path, port: int, name: str, kit: Path, cut: bool) -> dict[str, Any]:
    spec = root / f"{name}.json"
    spec.write_text(json.dumps({"name": name, "kit": str(kit), "coordinator": f"{COORD_IP}:{port}", "cut": cut}))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(link.exec_in("site") + [PY, "-m", "bench.link", "--site", str(spec)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=open(root / f"{name}.log", "ab"), text=True, env=env)  # noqa: SIM115
    assert proc.stdout is not None
    result: dict[str, Any] = {}
    for line in proc.stdout:
        if line.strip() == "cut":
            link.cut(True)
            time.sleep(CUT_S)
            link.cut(False)
        elif line.startswith("{"):
            result = json.loads(line)
    if proc.wait(60) != 0 or not result:
        raise RuntimeError(f"{name} failed:\n" + (root / f"{name}.log").read_text()[-3000:])
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--userspace", action="store_true", help="use the userspace emulator even where netem exists")
    ap.add_argument("--tcp-server", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--tcp-client", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--site", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tcp_server:
        tcp_server(int(args.tcp_server[0]), args.tcp_server[1], int(args.tcp_server[2]))
        return
    if args.tcp_client:
        tcp_client(args.tcp_client[0], int(args.tcp_client[1]), args.tcp_client[2], int(args.tcp_client[3]))
        return
    if args.site:
        site_main(Path(args.site))
        return
    if os.geteuid() != 0:
        sys.exit("bench.link needs root (network namespaces and TUN devices)")
    adapter = 80 << 20
    rows: list[Row] = []
    notes: list[str] = []
    capacity = None
    with TunLink("fbcap", 0, 0.0, 0.0) as free:  # the emulator alone, unshaped: it must not be the bottleneck
        capacity = adapter * 8 / raw_tcp(free, "up", adapter)
    with make_link("fbl", RATE_BPS, RTT_S, LOSS, force_userspace=args.userspace) as link:
        notes.append(f"link: {link.describe}; TCP congestion control in both namespaces: "
                     + subprocess.run(link.exec_in("site") + ["sysctl", "-n", "net.ipv4.tcp_congestion_control"],
                                      capture_output=True, text=True).stdout.strip())
        raw_up = adapter * 8 / raw_tcp(link, "up", adapter)
        raw_down = adapter * 8 / raw_tcp(link, "down", adapter)
        with tempfile.TemporaryDirectory(prefix="fedbridge-link-") as tmp:
            root = Path(tmp)
            proc, port, kits = start_coordinator(link, root)
            try:
                r1 = run_site(link, root, port, SITES[0], kits[SITES[0]], cut=False)
                r2 = run_site(link, root, port, SITES[1], kits[SITES[1]], cut=True)
            finally:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        notes.append(f"emulator packet counters: {link.stats()}")
    up_bps = r1["upload_bytes"] * 8 / r1["upload_s"]
    down_bps = r1["download_bytes"] * 8 / r1["download_s"]
    rows.append(Row("upload goodput (80 MiB signed delta, UploadUpdate) / link rate", up_bps / 1e6, RATE_BPS / 1e6,
                    up_bps / RATE_BPS, "Mbit/s", f">= {GOODPUT_GOAL}", up_bps / RATE_BPS >= GOODPUT_GOAL))
    rows.append(Row("download goodput (80 MiB global adapter, DownloadAdapter) / link rate", down_bps / 1e6,
                    RATE_BPS / 1e6, down_bps / RATE_BPS, "Mbit/s", f">= {GOODPUT_GOAL}",
                    down_bps / RATE_BPS >= GOODPUT_GOAL))
    rows.append(Row("upload goodput / raw TCP through the same link (80 MiB)", up_bps / 1e6, raw_up / 1e6,
                    up_bps / raw_up, "Mbit/s", "informational", None))
    rows.append(Row("download goodput / raw TCP through the same link (80 MiB)", down_bps / 1e6, raw_down / 1e6,
                    down_bps / raw_down, "Mbit/s", "informational", None))
    ratio = r2["upload_s"] / (r1["upload_s"] + CUT_S)
    rows.append(Row(f"upload with a {CUT_S:g} s cut at {CUT_AT:.0%}: t / (t uncut + {CUT_S:g} s)", r2["upload_s"],
                    r1["upload_s"] + CUT_S, ratio, "s", f"<= {CUT_GOAL}", ratio <= CUT_GOAL))
    rows.append(Row("second site's download goodput / link rate", r2["download_bytes"] * 8 / r2["download_s"] / 1e6,
                    RATE_BPS / 1e6, r2["download_bytes"] * 8 / r2["download_s"] / RATE_BPS, "Mbit/s",
                    "informational", None))
    if capacity is not None:
        rows.append(Row("emulator capacity: raw TCP through it unshaped / link rate", capacity / 1e6, RATE_BPS / 1e6,
                        capacity / RATE_BPS, "Mbit/s", "informational (must be well above 1)", None))
    notes.append(f"adapter: {r1['tensor_bytes']} tensor bytes ({r1['tensor_bytes'] / (1 << 20):.2f} MiB), payload "
                 f"{r1['upload_bytes']} bytes (safetensors); times include the TLS handshake-free steady stream of "
                 "one RPC each (the channel is already connected by Join/FetchTask)")
    write_results("link", rows, notes)


if __name__ == "__main__":
    main()
