"""``fedbridge simulate`` end to end: 4 virtual sites, 1 round on a real local Ray, then nothing of Ray is left; and
``--ray-address`` joining a real Ray cluster this test starts (``ray start --head`` on loopback), with mixed ranks.

Marked ``slow`` and ``flower``: Ray's start-up alone takes 35 s or more on a loaded 2-core box (measured: the whole
run took 4 min at load average 12), far over the default run's budget for one test. Run with ``-m flower``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.flower]

ROOT = Path(__file__).resolve().parents[2]


def _ray_pids() -> set[int]:
    out = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(name in cmd for name in ("gcs_server", "raylet", "ray::", "default_worker.py")):
            out.add(p.info["pid"])
    return out


def test_four_sites_one_round_on_ray(tmp_path: Path, tiny_model_dir: Path) -> None:
    before, temps = _ray_pids(), set(glob.glob("/tmp/fbray-*"))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-m", "sandbox", "simulate", "--sites", "4", "--rounds", "1", "--steps", "1",
                        "--num-cpus", "2", "--base-model", str(tiny_model_dir), "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert len(res["rounds"]) == 1
    row = res["rounds"][0]
    assert row["sampled"] == 4 and row["replied"] == 4  # every virtual site trained and was aggregated
    assert res["ray"]["gcs_address"].startswith("127.0.0.2:") and res["ray"]["nodes"] == 1  # loopback only
    assert math.isfinite(row["heldout_loss"]) and row["heldout_loss"] < res["initial_loss"]
    assert row["wall_s"] > 0 and res["peak_rss_mib"] > 100  # the driver alone holds torch
    assert (out / "results.md").read_text().count("\n| 1 |") == 1
    assert len((out / "results.csv").read_text().splitlines()) == 3  # header, round 0, round 1
    assert sorted(x.name for x in (out / "data").glob("site-*.jsonl")) == [f"site-{i}.jsonl" for i in range(4)]
    # Ray is gone: no GCS, raylet or worker of this run is left, nor its temp folder.
    deadline = time.monotonic() + 20  # raylet's children exit just after the run's process
    while not _ray_pids() <= before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _ray_pids() <= before
    assert set(glob.glob("/tmp/fbray-*")) <= temps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cluster_pids(temp_dir: str) -> set[int]:
    out = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if temp_dir in " ".join(p.info["cmdline"] or []) or any(f.path.startswith(temp_dir)
                                                                    for f in p.open_files()):
                out.add(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A real one-node Ray cluster on loopback (its own temp dir and ports), as a research group's head node runs it;
    ended at the end by its processes (``ray stop`` would end every Ray on the machine)."""
    temp = tempfile.mkdtemp(prefix="fbraycluster-", dir="/tmp")  # Ray's socket paths must stay short
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    # 127.0.0.2, not .1: Ray replaces a node address of 127.0.0.1 with the host's interface address.
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.2",
           f"--port={port}", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp}", "--include-dashboard=false",
           "--disable-usage-stats", f"--ray-client-server-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        yield f"127.0.0.2:{port}"
    finally:
        for pid in _cluster_pids(temp):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        deadline = time.monotonic() + 20
        while _cluster_pids(temp) and time.monotonic() < deadline:
            time.sleep(0.5)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_address_joins_an_existing_cluster_and_leaves_it_running(tmp_path: Path, tiny_model_dir: Path,
                                                                       ray_cluster: str) -> None:
    # Prepare: the cluster is up; this run must start no Ray of its own
    temps = set(glob.glob("/tmp/fbray-*"))
    gcs = [p for p in psutil.process_iter(["cmdline"]) if "gcs_server" in " ".join(p.info["cmdline"] or [])
           and f"--gcs_server_port={ray_cluster.rsplit(':', 1)[1]}" in " ".join(p.info["cmdline"] or [])]
    assert len(gcs) == 1
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    # Execute: 2 sites of ranks 4 and 2 under HetLoRA, one round, on the cluster
    p = subprocess.run([sys.executable, "-m", "sandbox", "simulate", "--sites", "2", "--rounds", "1", "--steps", "1",
                        "--strategy", "hetlora", "--rank", "4", "--lora-ranks", "4,2", "--ray-address", ray_cluster,
                        "--base-model", str(tiny_model_dir), "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    # Assert: it ran on that cluster (its GCS, its 2 CPUs), both sites trained at their own rank, and the cluster
    # is still there afterwards (a joined cluster is not the run's to stop); no local Ray was started.
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["ray"] == {"gcs_address": ray_cluster, "nodes": 1, "cpus": 2.0}
    assert res["rounds"][0]["replied"] == 2 and math.isfinite(res["rounds"][0]["heldout_loss"])
    sent = {}
    for site in ("site-0", "site-1"):
        records = [json.loads(line) for line in (out / "sites" / site / "audit.jsonl").read_text().splitlines()]
        [update] = [r for r in records if r.get("event") == "update_sent"]
        sent[site] = update["fields"]["bytes"]
    assert sent["site-1"] < 0.6 * sent["site-0"]  # rank 2 against rank 4: about half the adapter
    assert gcs[0].is_running()
    assert set(glob.glob("/tmp/fbray-*")) <= temps
