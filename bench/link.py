"""The cross-border link: one site uploads and downloads an 80 MiB adapter over a shaped WAN link, and resumes an
upload across a 30 s cut.

The link (:mod:`bench.linkemu`): 50 Mbit/s each way, 150 ms RTT, 0.5 % random loss each way, between two network
namespaces; kernel netem where the kernel has it, else the userspace TUN emulator (the output says which ran). The
coordinator runs in one namespace, the site in the other, both as real processes with mutual TLS.

The adapter: LoRA r=16 on every linear layer of a Llama-3-8B-shaped base (hidden 4096, MLP 14336, 32 layers,
32 query / 8 KV heads) in bf16: 32 × (q 16·(4096+4096) + k, v 16·(4096+1024) + o 16·(4096+4096) + gate, up, down
16·(4096+14336)) = 41 943 040 parameters = 80 MiB. The base is config-only (the coordinator builds the adapter
spec on the meta device and never reads base weights), so no 16 GB of weights are needed.

Three rounds of one site, which keeps its channel (one TCP connection) for the whole federation, as an agent does.
Each round the site downloads the global adapter (the real DownloadAdapter stream) and uploads its signed delta
(the real UploadUpdate stream); the coordinator aggregates and opens the next round in between.

- Round 1 is the connection's first bulk transfer each way: TCP (BBR) starts from its initial window, fills the
  bottleneck queue while it probes, and recovers from the drops. Information only, beside raw TCP's first
  transfer on a fresh connection.
- Round 2 is the steady state of every later round: the goal rows (goodput / link rate each way, >= 0.85), beside
  raw TCP's later transfers on one kept connection.
- Round 3 cuts the link for 30 s once 40 % of the upload has been handed to gRPC; the site client's own retry and
  resume (GetUploadStatus, then UploadUpdate from the acknowledged offset) finishes it. Goal: t(cut upload) /
  (t(round 2's upload) + 30 s) <= 1.1.

The emulator's own capacity (unshaped raw TCP through it) must be well above the link's rate for the rows to mean
anything; it is printed too.

Run as root: ``python -m bench.link`` (about 5 minutes).
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
SITE = "site-eu"
ROUNDS, CUT_ROUND = 3, 3
PY = sys.executable


# -- raw TCP reference (each end runs in its namespace) ----------------------------------------------------------
TCP_PAUSE_S = 2.0  # between the transfers on one connection (the link goes quiet, as between rounds)


def _send(conn: socket.socket, nbytes: int) -> None:
    block, left = bytes(1 << 20), nbytes
    while left:
        conn.sendall(block[:min(left, len(block))])
        left -= min(left, len(block))


def _receive(conn: socket.socket, nbytes: int) -> int:
    """Read ``nbytes`` (fewer if the peer closes first); returns how many came."""
    buf, got = memoryview(bytearray(1 << 20)), 0
    while got < nbytes:
        n = conn.recv_into(buf, min(len(buf), nbytes - got))
        if not n:
            break
        got += n
    return got


def tcp_server(port: int, mode: str, nbytes: int, reps: int) -> None:
    """``reps`` transfers on one connection: ``up`` reads ``nbytes`` then answers one byte; ``down`` sends
    ``nbytes`` after one byte."""
    srv = socket.create_server(("0.0.0.0", port))
    print("ready", flush=True)
    conn, _ = srv.accept()
    for _ in range(reps):
        if mode == "up":
            if _receive(conn, nbytes) < nbytes:
                return
            conn.sendall(b"k")
        else:
            if not conn.recv(1):
                return
            _send(conn, nbytes)
    conn.close()


def tcp_client(host: str, port: int, mode: str, nbytes: int, reps: int) -> None:
    """Prints the seconds of each of ``reps`` transfers on one connection (the first includes its setup)."""
    t0 = time.monotonic()
    conn = socket.create_connection((host, port), timeout=300)
    seconds = []
    for i in range(reps):
        if i:
            time.sleep(TCP_PAUSE_S)
            t0 = time.monotonic()
        if mode == "up":
            _send(conn, nbytes)
            assert conn.recv(1) == b"k"
        else:
            conn.sendall(b"g")
            got = _receive(conn, nbytes)
            assert got == nbytes, got
        seconds.append(time.monotonic() - t0)
    print(json.dumps({"seconds": seconds}), flush=True)


def raw_tcp(link: Any, mode: str, nbytes: int, reps: int = 1) -> list[float]:
    """Seconds of ``reps`` raw TCP transfers on one connection, site -> coordinator (``up``) or back (``down``);
    the first includes the connection's setup."""
    me = [PY, "-m", "bench.link"]
    srv = subprocess.Popen(link.exec_in("coord") + me + ["--tcp-server", str(TCP_PORT), mode, str(nbytes), str(reps)],
                           cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        out = subprocess.run(link.exec_in("site") + me + ["--tcp-client", COORD_IP, str(TCP_PORT), mode, str(nbytes),
                                                          str(reps)],
                             cwd=ROOT, capture_output=True, text=True, timeout=600, check=True).stdout
        return [float(x) for x in json.loads(out.strip().splitlines()[-1])["seconds"]]
    finally:
        srv.wait(30)


# -- the site (runs in the site namespace) -----------------------------------------------------------------------
def site_main(spec_path: Path) -> None:
    """One site, every round on one channel: download the global adapter, then upload a signed delta, and print the
    round's timings as a JSON line; in round ``cut_round`` it prints ``cut`` once CUT_AT of the payload went to gRPC
    (the parent cuts the link)."""
    import logging

    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from protos.fedbridge.v1 import federation_service_pb2 as pb
    from site_agent.client import CoordinatorClient
    from site_agent.config import SiteConfig, SiteData, SiteTls

    spec = json.loads(spec_path.read_text())
    kit = Path(spec["kit"])
    cfg = SiteConfig(name=spec["name"], coordinator=spec["coordinator"], base_model=kit, work_dir=kit,
                     tls=SiteTls(kit / "ca.pem", kit / "client.pem", kit / "client.key", kit / "signing.key"),
                     data=SiteData(kit / "unused.jsonl"), server_name="localhost", fetch_wait_ms=5_000,
                     retry_for_s=600)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")  # retries, resume
    key = load_pem_private_key(cfg.tls.signing_key.read_bytes(), password=None)
    client = CoordinatorClient(cfg)
    client.join("bench-link", 0)
    done = 0
    while done < spec["rounds"]:
        resp = client.fetch_task(cfg.fetch_wait_ms)
        if resp.status == pb.TASK_STATUS_TRAIN and resp.task.round > done:
            _site_round(client, key, resp.task, resp.task.round == spec["cut_round"])
            done = resp.task.round
    client.close()


def _site_round(client: Any, key: Any, task: Any, cut: bool) -> None:
    import torch

    from fedcommon import tensors
    from protos import codec

    t0 = time.monotonic()
    client.download_adapter(task.round, task.global_adapter_sha256, task.global_adapter_size)
    t_down = time.monotonic() - t0
    g = torch.Generator().manual_seed(task.round)
    payload = tensors.encode_state({t.name: (torch.randn(*t.shape, generator=g) * 1e-3).to(torch.bfloat16)
                                    for t in task.adapter_spec.tensors})
    env = codec.make_envelope(federation_id=task.federation_id, round=task.round, site=client.cfg.name,
                              base_model_sha256=task.base_model_sha256, payload=payload,
                              adapter_spec_sha256=task.adapter_spec.sha256, num_examples=10)
    signed = codec.sign_envelope(env, key)  # type: ignore[arg-type]
    told = threading.Event()
    last_chunk: list[float] = []

    def progress(sent: int) -> None:
        if cut and not told.is_set() and sent >= CUT_AT * len(payload):
            told.set()
            print("cut", flush=True)
        if sent == len(payload):
            last_chunk.append(time.monotonic())

    t0 = time.monotonic()
    client.upload(signed, env, payload, on_progress=progress)
    t1 = time.monotonic()
    t_up = t1 - t0
    print(json.dumps({"round": task.round, "download_s": t_down, "download_bytes": task.global_adapter_size, "upload_s": t_up,
                      "upload_ack_s": t1 - last_chunk[-1] if last_chunk else None, "upload_bytes": len(payload),
                      "tensor_bytes": sum(2 * _numel(t.shape) for t in task.adapter_spec.tensors)}), flush=True)


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def link_rows(rounds: dict[int, dict[str, Any]], raw: dict[str, list[float]], capacity: float | None) -> list[Row]:
    """The table: ``rounds`` (round -> the site's timings), ``raw`` (mode -> raw TCP bit/s of each transfer on one
    connection, the first on a fresh one), the emulator's unshaped capacity in bit/s."""
    def bps(r: dict[str, Any], way: str) -> float:
        return float(r[f"{way}_bytes"] * 8 / r[f"{way}_s"])

    rows: list[Row] = []
    first, steady, cut = rounds[1], rounds[2], rounds[CUT_ROUND]
    for way, rpc, mode in (("upload", "UploadUpdate, signed delta", "up"), ("download", "DownloadAdapter", "down")):
        got = bps(steady, way)
        rows.append(Row(f"{way} goodput, round 2: the steady state of every later round (80 MiB, {rpc}) / link rate",
                        got / 1e6, RATE_BPS / 1e6, got / RATE_BPS, "Mbit/s", f">= {GOODPUT_GOAL}",
                        got / RATE_BPS >= GOODPUT_GOAL))
        kept = sum(raw[mode][1:]) / len(raw[mode][1:])
        rows.append(Row(f"{way} goodput, round 2 / raw TCP's later transfers on one kept connection", got / 1e6,
                        kept / 1e6, got / kept, "Mbit/s", "informational", None))
        cold = bps(first, way)
        rows.append(Row(f"{way} goodput, round 1: the connection's first bulk transfer this way (TCP starts from its "
                        "initial window) / link rate", cold / 1e6, RATE_BPS / 1e6, cold / RATE_BPS, "Mbit/s",
                        "informational", None))
        rows.append(Row(f"{way} goodput, round 1 / raw TCP's first transfer on a fresh connection", cold / 1e6,
                        raw[mode][0] / 1e6, cold / raw[mode][0], "Mbit/s", "informational", None))
    if steady.get("upload_ack_s") is not None:
        rows.append(Row("upload, round 2: last chunk handed to gRPC -> accepted (what was still in flight, then the "
                        "coordinator's check, fsync and claim of 80 MiB) / the whole upload", steady["upload_ack_s"],
                        steady["upload_s"], steady["upload_ack_s"] / steady["upload_s"], "s", "informational", None))
    ratio = cut["upload_s"] / (steady["upload_s"] + CUT_S)
    rows.append(Row(f"upload with a {CUT_S:g} s cut at {CUT_AT:.0%} (round {CUT_ROUND}): t / (t round 2 uncut + "
                    f"{CUT_S:g} s)", cut["upload_s"], steady["upload_s"] + CUT_S, ratio, "s", f"<= {CUT_GOAL}",
                    ratio <= CUT_GOAL))
    if capacity is not None:
        rows.append(Row("emulator capacity: raw TCP through it unshaped / link rate", capacity / 1e6, RATE_BPS / 1e6,
                        capacity / RATE_BPS, "Mbit/s", "informational (must be well above 1)", None))
    return rows


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
    pki = create_dev_pki(root / "pki", [SITE], hosts=("localhost", COORD_IP))
    state = root / "state"
    cfg = {"federation_id": "link", "base_model": str(base), "base_model_ref": "bench/llama-8b-shapes", "rounds": ROUNDS,
           "min_sites": 1, "listen": f"{COORD_IP}:0", "state_dir": str(state), "registry_dir": str(root / "published"),
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
    return proc, int(port_file.read_text()), {SITE: pki.sites[SITE].dir}


def run_site(link: Any, root: Path, port: int, name: str, kit: Path) -> dict[int, dict[str, Any]]:
    """The site's every round: round -> its timings."""
    spec = root / f"{name}.json"
    spec.write_text(json.dumps({"name": name, "kit": str(kit), "coordinator": f"{COORD_IP}:{port}",
                                "rounds": ROUNDS, "cut_round": CUT_ROUND}))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(link.exec_in("site") + [PY, "-m", "bench.link", "--site", str(spec)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=open(root / f"{name}.log", "ab"), text=True, env=env)  # noqa: SIM115
    assert proc.stdout is not None
    result: dict[int, dict[str, Any]] = {}
    for line in proc.stdout:
        if line.strip() == "cut":
            link.cut(True)
            time.sleep(CUT_S)
            link.cut(False)
        elif line.startswith("{"):
            got = json.loads(line)
            result[got["round"]] = got
    if proc.wait(60) != 0 or sorted(result) != list(range(1, ROUNDS + 1)):
        raise RuntimeError(f"{name} failed:\n" + (root / f"{name}.log").read_text()[-3000:])
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--userspace", action="store_true", help="use the userspace emulator even where netem exists")
    ap.add_argument("--tcp-server", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--tcp-client", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--site", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tcp_server:
        tcp_server(int(args.tcp_server[0]), args.tcp_server[1], int(args.tcp_server[2]), int(args.tcp_server[3]))
        return
    if args.tcp_client:
        tcp_client(args.tcp_client[0], int(args.tcp_client[1]), args.tcp_client[2], int(args.tcp_client[3]),
                   int(args.tcp_client[4]))
        return
    if args.site:
        site_main(Path(args.site))
        return
    if os.geteuid() != 0:
        sys.exit("bench.link needs root (network namespaces and TUN devices)")
    adapter = 80 << 20
    notes: list[str] = []
    with TunLink("fbcap", 0, 0.0, 0.0) as free:  # the emulator alone, unshaped: it must not be the bottleneck
        capacity = adapter * 8 / raw_tcp(free, "up", adapter)[0]
    with make_link("fbl", RATE_BPS, RTT_S, LOSS, force_userspace=args.userspace) as link:
        notes.append(f"link: {link.describe}; TCP congestion control in both namespaces: "
                     + subprocess.run(link.exec_in("site") + ["sysctl", "-n", "net.ipv4.tcp_congestion_control"],
                                      capture_output=True, text=True).stdout.strip())
        # Raw TCP: the first transfer of a fresh connection, then two more on it (their mean: the kept connection).
        raw = {mode: [adapter * 8 / t for t in raw_tcp(link, mode, adapter, reps=3)] for mode in ("up", "down")}
        with tempfile.TemporaryDirectory(prefix="fedbridge-link-") as tmp:
            root = Path(os.environ.get("FEDBRIDGE_LINK_KEEP") or tmp)  # a folder to keep the logs in, for diagnosis
            root.mkdir(parents=True, exist_ok=True)
            proc, port, kits = start_coordinator(link, root)
            try:
                rounds = run_site(link, root, port, SITE, kits[SITE])
            finally:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        notes.append(f"emulator packet counters: {link.stats()}")
    rows = link_rows(rounds, raw, capacity)
    r1 = rounds[1]
    notes.append(f"adapter: {r1['tensor_bytes']} tensor bytes ({r1['tensor_bytes'] / (1 << 20):.2f} MiB), payload "
                 f"{r1['upload_bytes']} bytes (safetensors); times are of one RPC each on the site's one channel "
                 "(connected by Join/FetchTask before round 1); upload times run from the call to the coordinator's "
                 "acceptance")
    write_results("link", rows, notes)


if __name__ == "__main__":
    main()
