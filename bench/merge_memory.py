"""Peak memory of fedbridge's layer-by-layer LoRA merge vs a naive full ``merge_and_unload``, on identical inputs.

A ~136 M-parameter Llama-shaped base (542 MB in float32, random weights, built here) and an all-linear LoRA r=16
adapter are merged twice, each in a fresh process that imports the same libraries first:

- ours: :func:`coordinator.release.merge.merge_to_dir` (streams tensor by tensor from the base's safetensors to sharded
  safetensors);
- reference: ``PeftModel`` on the loaded base, ``merge_and_unload()``, ``save_pretrained()`` (what ms-swift users run
  out of memory on).

Each child resets its peak-RSS counter after the imports (``/proc/self/clear_refs``), so the number compared is the
peak resident memory the merge itself added. Both outputs are checked equal, tensor by tensor.

Run: ``.venv/bin/python -m bench.merge_memory`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import Row, write_results  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, RANK = 1024, 2816, 8, 16000, 16
MODULES = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
GOAL = 0.5  # ours must add at most half the reference's peak


def _peak_kib() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def build_inputs(root: Path) -> tuple[Path, Path]:
    """Write the base model directory and the adapter (PEFT key names) under ``root``."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                      num_attention_heads=16, num_key_value_heads=16, vocab_size=VOCAB, tie_word_embeddings=False)
    base = root / "base"
    LlamaForCausalLM(cfg).save_pretrained(base)  # one model.safetensors of ~542 MB
    state = {}
    for i in range(LAYERS):
        for block, names in MODULES.items():
            for name in names:
                out_f = INTERMEDIATE if name in ("gate_proj", "up_proj") else HIDDEN
                in_f = INTERMEDIATE if name == "down_proj" else HIDDEN
                prefix = f"base_model.model.model.layers.{i}.{block}.{name}"
                state[f"{prefix}.lora_A.weight"] = torch.randn(RANK, in_f) * 0.02
                state[f"{prefix}.lora_B.weight"] = torch.randn(out_f, RANK) * 0.02
    adapter = root / "adapter.safetensors"
    save_file(state, str(adapter))
    return base, adapter


def child(mode: str, base: Path, adapter: Path, out: Path) -> None:
    """Run one merge and print ``{"baseline_kib", "peak_kib", "seconds"}`` as JSON."""
    import peft  # noqa: F401 - same imports in both modes, before the baseline
    import torch
    import transformers  # noqa: F401
    from safetensors.torch import load_file

    from coordinator.release.merge import merge_to_dir
    from coordinator.rounds.adapter import peft_model_with
    from fedcommon import tensors

    state = load_file(str(adapter))
    spec = tensors.make_adapter_spec(state, RANK, 2.0 * RANK, 0.0, [n for names in MODULES.values() for n in names])
    torch.set_num_threads(2)
    baseline = _rss_kib()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    t0 = time.perf_counter()
    if mode == "ours":
        merge_to_dir(base, state, rank=RANK, alpha=2.0 * RANK, out_dir=out)
    else:
        merged = peft_model_with(base, spec, state).merge_and_unload()
        merged.save_pretrained(out)
    print(json.dumps({"baseline_kib": baseline, "peak_kib": _peak_kib(), "seconds": time.perf_counter() - t0}))


def _run_child(mode: str, base: Path, adapter: Path, out: Path) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "bench.merge_memory", "--child", mode, "--base", str(base),
                           "--adapter", str(adapter), "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} merge failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_abs_diff(a_dir: Path, b_dir: Path) -> float:
    """Largest |a - b| over every tensor of two HF safetensors directories (one tensor in memory at a time)."""
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        idx = d / "model.safetensors.index.json"
        if idx.exists():
            return {k: d / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return {k: d / "model.safetensors" for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__

    ia, ib = index(a_dir), index(b_dir)
    if ia.keys() != ib.keys():
        raise AssertionError(f"tensor names differ: {sorted(ia.keys() ^ ib.keys())[:3]}")
    worst = 0.0
    for k in sorted(ia):
        with safe_open(str(ia[k]), "pt") as fa, safe_open(str(ib[k]), "pt") as fb:
            worst = max(worst, float((fa.get_tensor(k) - fb.get_tensor(k)).abs().max()))
    return worst


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="fedbridge-merge-mem-") as tmp:
        root = Path(tmp)
        base, adapter = build_inputs(root)
        size_mib = (base / "model.safetensors").stat().st_size / 2**20
        ours = _run_child("ours", base, adapter, root / "ours")
        ref = _run_child("naive", base, adapter, root / "naive")
        diff = _max_abs_diff(root / "ours", root / "naive")
    ours_mib = (ours["peak_kib"] - ours["baseline_kib"]) / 1024
    ref_mib = (ref["peak_kib"] - ref["baseline_kib"]) / 1024
    ratio = ours_mib / ref_mib
    rows = [
        Row("peak RSS added by the merge: layer-by-layer vs merge_and_unload + save_pretrained", ours_mib, ref_mib,
            ratio, "MiB", f"<= {GOAL}", ratio <= GOAL),
        Row("peak RSS added, as a fraction of the model size (ours vs reference)", ours_mib / size_mib,
            ref_mib / size_mib, ratio, "model copies", "ours <= 0.5 copies", ours_mib / size_mib <= 0.5),
        Row("merge wall time", ours["seconds"], ref["seconds"], ours["seconds"] / ref["seconds"], "s",
            "<= 1.0", ours["seconds"] <= ref["seconds"]),
    ]
    write_results("merge_memory", rows, [
        f"base: Llama, hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}, float32, {size_mib:.0f} MiB; adapter: all-linear "
        f"LoRA r={RANK}; max |ours - reference| over all merged tensors: {diff:.3g}",
        "Each merge runs in a fresh process; its peak RSS counter is reset after the shared imports.",
    ])
    if diff > 1e-5:
        raise SystemExit(f"merged weights differ from the reference by {diff}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=("ours", "naive"))
    ap.add_argument("--base", type=Path)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.base, args.adapter, args.out)
    else:
        main()
