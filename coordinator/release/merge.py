"""Merge a LoRA adapter into its base model one tensor at a time, straight from and to safetensors files.

The usual way, ``PeftModel.merge_and_unload()`` then ``save_pretrained``, holds the whole base model in memory and,
while saving, more (ms-swift users hit out-of-memory exactly here). This merge never builds a model: it reads the
base checkpoint's safetensors headers, plans the output shards, then streams each tensor in turn: read it from the
base file, add ``alpha / r * B @ A`` if LoRA targets it, and write it to its output shard. A tensor no adapter
touches is copied as raw bytes, a few MiB at a time; a targeted one is merged a block of rows at a time. Peak memory
is the adapter plus one such block, whatever the model's size, even for a vocabulary-sized output projection
(``bench/merge_memory.py`` and ``bench/real_shapes.py`` measure it).

The output is a plain Hugging Face directory (``model-0000i-of-0000n.safetensors`` shards,
``model.safetensors.index.json``, and the base's config, generation config, tokenizer and other small files), so
stock ``AutoModelForCausalLM.from_pretrained`` loads it. Files are read with ordinary reads, not memory maps, so the
base's pages do not pile up in the process's resident memory either.

LoRA math (PEFT ``Linear``, no rsLoRA/DoRA): ``W' = W + (alpha / r) * B @ A`` with ``A = lora_A.weight``
(r x in) and ``B = lora_B.weight`` (out x r). A ``Conv1D`` weight (GPT-2) is stored ``[in, out]`` (PEFT's
``fan_in_fan_out``), so its product is transposed first; which weights those are comes from the base's module tree,
built from ``config.json`` on the meta device. Adapter keys are PEFT's saved form,
``base_model.model.<module>.lora_A.weight``; ``<module>.weight`` must name a tensor of the base checkpoint, else
:class:`MergeError` says which (a model whose checkpoint names differ from its modules needs the in-memory merge).

Tied embeddings: when ``tie_word_embeddings`` shares the output projection with the input embedding, the checkpoint
holds only the embedding. An adapter on the output projection (``lm_head``) then gets an untied ``lm_head.weight``
of its own (embedding + product) and the merged ``config.json`` says ``tie_word_embeddings: false``: the embedding
stays as it was, as in the PEFT model (folding the product into the shared tensor would change the input embedding
too). Adapters that do not touch the output projection leave the tie, and the checkpoint, as they are.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from protos.fedbridge.v1 import federation_service_pb2 as pb

if TYPE_CHECKING:
    from coordinator.rounds.adapter import BaseLayout

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".onnx")
SKIP_FILES = {INDEX_NAME, "pytorch_model.bin.index.json", "fedbridge-manifest.json"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class MergeError(ValueError):
    """The adapter cannot be merged into this base checkpoint file by file (the message says why)."""


@dataclass(frozen=True)
class _TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in ``file``
    nbytes: int


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_to_dir` wrote.

    Attributes:
        out_dir: The merged model directory.
        shards: Shard file names, in order.
        merged_modules: Base tensors that received a LoRA product.
        total_bytes: Bytes of tensor data written.
    """

    out_dir: Path
    shards: tuple[str, ...]
    merged_modules: tuple[str, ...]
    total_bytes: int


def _read_header(path: Path) -> list[_TensorEntry]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise MergeError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        header = json.loads(f.read(n))
    entries = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _DTYPES:
            raise MergeError(f"{path}: tensor {name!r} has dtype {meta['dtype']}, which this merge does not read")
        start, end = meta["data_offsets"]
        entries.append(_TensorEntry(name, meta["dtype"], tuple(meta["shape"]), path, 8 + n + start, end - start))
    return sorted(entries, key=lambda e: e.start)


def base_tensors(base_dir: Path) -> list[_TensorEntry]:
    """Every tensor of a safetensors checkpoint (single file or sharded with an index), in file order."""
    base_dir = Path(base_dir)
    index = base_dir / INDEX_NAME
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (base_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise MergeError(f"{base_dir} holds no safetensors checkpoint (model.safetensors or {INDEX_NAME})")
    return [e for name in files for e in _read_header(base_dir / name)]


def _read_rows(f, entry: _TensorEntry, r0: int, r1: int) -> torch.Tensor:  # noqa: ANN001 - a binary file object
    """Rows ``r0:r1`` (along dim 0) of a stored tensor, as a tensor of its own dtype."""
    row_bytes = entry.nbytes // entry.shape[0]
    f.seek(entry.start + r0 * row_bytes)
    buf = bytearray((r1 - r0) * row_bytes)
    if f.readinto(buf) != len(buf):
        raise MergeError(f"{entry.file}: tensor {entry.name!r} is truncated")
    return torch.frombuffer(buf, dtype=_DTYPES[entry.dtype]).reshape((r1 - r0, *entry.shape[1:]))


def lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Map ``<module>.weight`` of the base to its ``(A, B)`` from a PEFT adapter state dict.

    Raises:
        MergeError: On keys that are not plain LoRA A/B weights (DoRA magnitudes, biases, modules_to_save, embedding
            LoRA) or an A without its B.
    """
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in state:
        if key.endswith(".lora_B.weight"):
            continue
        if not key.endswith(".lora_A.weight"):
            raise MergeError(f"adapter key {key!r} is not a LoRA A/B weight; only plain LoRA merges file by file")
        module = key[: -len(".lora_A.weight")]
        b_key = module + ".lora_B.weight"
        if b_key not in state:
            raise MergeError(f"adapter has {key!r} but not {b_key!r}")
        name = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
        pairs[name + ".weight"] = (state[key], state[b_key])
    orphans = [k for k in state if k.endswith(".lora_B.weight") and k.replace(".lora_B.", ".lora_A.") not in state]
    if orphans:
        raise MergeError(f"adapter has {orphans[0]!r} but not its lora_A")
    return pairs


def _plan_shards(entries: list[_TensorEntry], max_shard_bytes: int) -> list[list[_TensorEntry]]:
    shards: list[list[_TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def _header_bytes(entries: list[_TensorEntry]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


def _copy_raw(f, entry: _TensorEntry, chunk_bytes: int) -> Iterator[bytes]:  # noqa: ANN001 - a binary file
    """The stored bytes of a tensor no adapter touches, ``chunk_bytes`` at a time: no tensor is ever built."""
    f.seek(entry.start)
    left = entry.nbytes
    while left:
        buf = f.read(min(left, chunk_bytes))
        if not buf:
            raise MergeError(f"{entry.file}: tensor {entry.name!r} is truncated")
        left -= len(buf)
        yield buf


def _merged_rows(f, e: _TensorEntry, pair: tuple[torch.Tensor, torch.Tensor] | None,  # noqa: ANN001
                 residual: torch.Tensor | None, scale: float, fan_in_fan_out: bool, chunk_bytes: int) -> Iterator[bytes]:
    """``W + residual + scale * B @ A`` for one weight, a block of rows at a time, in the weight's own dtype.

    Working in row blocks bounds memory by ``chunk_bytes`` (of float32 work) whatever the weight's size, which
    matters for the largest tensors a LoRA can target, such as a tied output projection the size of the vocabulary.
    Rows of a ``Linear`` weight ``[out, in]`` are output features, so rows ``r0:r1`` of the product are
    ``B[r0:r1] @ A``; a ``Conv1D`` weight is stored ``[in, out]``, so its rows are ``(B @ A[:, r0:r1]).T``.
    """
    if len(e.shape) != 2:
        raise MergeError(f"{e.name!r} has shape {e.shape}; LoRA and FedEx residuals apply to 2-D weights only")
    rows, cols = e.shape
    if pair is not None:
        a, b = pair[0].to(torch.float32), pair[1].to(torch.float32)
        product = (a.shape[1], b.shape[0]) if fan_in_fan_out else (b.shape[0], a.shape[1])
        if a.shape[0] != b.shape[1] or product != (rows, cols):
            raise MergeError(f"LoRA product for {e.name!r} has shape {product}, the base tensor {e.shape}")
    step = max(1, chunk_bytes // (4 * cols))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        stored = _read_rows(f, e, r0, r1)
        w = stored.to(torch.float32)
        if residual is not None:  # FedEx-LoRA: the federation's cumulative correction of the base weight
            w += residual[r0:r1].to(torch.float32)
        if pair is not None:
            w += ((a[:, r0:r1].T @ b.T) if fan_in_fan_out else (b[r0:r1] @ a)).mul_(scale)
        out = w.to(stored.dtype)
        del w, stored
        yield out.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _merged_stream(entries: list[_TensorEntry], pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   scale: float, residual: Mapping[str, torch.Tensor], fan_in_fan_out: frozenset[str] = frozenset(),
                   chunk_bytes: int = 32 << 20) -> Iterator[tuple[_TensorEntry, Iterator[bytes]]]:
    """Each base tensor in turn with an iterator over its merged bytes; the caller drains one before the next."""
    handles: dict[Path, object] = {}
    try:
        for e in entries:
            f = handles.get(e.file)
            if f is None:
                f = handles[e.file] = open(e.file, "rb")  # noqa: SIM115 - closed in the finally below
            if e.nbytes == 0 or (e.name not in pairs and e.name not in residual):
                yield e, _copy_raw(f, e, chunk_bytes)
            else:
                yield e, _merged_rows(f, e, pairs.get(e.name), residual.get(e.name), scale, e.name in fan_in_fan_out,
                                      chunk_bytes)
    finally:
        for f in handles.values():
            f.close()  # type: ignore[attr-defined]


def copy_side_files(base_dir: Path, out_dir: Path, only_tokenizer: bool = False) -> None:
    """Copy the base directory's small top-level files (config, tokenizer, licence...), never its weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in sorted(Path(base_dir).iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in SKIP_FILES or p.name.endswith(WEIGHT_SUFFIXES):
            continue
        if only_tokenizer and p.name not in TOKENIZER_FILES:
            continue
        shutil.copy2(p, out_dir / p.name)


def merge_to_dir(base_dir: Path, state: Mapping[str, torch.Tensor], *, rank: int, alpha: float, out_dir: Path,
                 max_shard_bytes: int = 2 << 30, residual: Mapping[str, torch.Tensor] | None = None,
                 layout: BaseLayout | None = None, chunk_bytes: int = 32 << 20) -> MergeResult:
    """Write ``base + adapter`` to ``out_dir`` as a sharded safetensors HF model directory, one tensor at a time.

    Args:
        base_dir: The base model directory (safetensors checkpoint, config, tokenizer).
        state: The adapter's PEFT state dict (``...lora_A.weight`` / ``...lora_B.weight``).
        rank: LoRA rank r.
        alpha: LoRA alpha (the product is scaled by ``alpha / r``).
        out_dir: Where to write (created; must not hold a checkpoint already).
        max_shard_bytes: Largest shard, in bytes of tensor data (a larger single tensor gets a shard of its own).
        residual: Already-scaled additions to base weights, by base tensor name, each in its weight's own layout
            (FedEx-LoRA's folded residual; ``[in, out]`` for a Conv1D weight).
        layout: Conv1D weights and tied embeddings of the base; by default read from ``base_dir/config.json``.
        chunk_bytes: The most bytes read, or of float32 work, at a time: untouched tensors are copied in pieces of
            this size, merged ones in blocks of rows of this size (at least one row).

    Returns:
        What was written.

    Raises:
        MergeError: If the adapter names a module the checkpoint lacks, has non-LoRA keys, or shapes disagree.
    """
    if rank <= 0 or max_shard_bytes <= 0 or chunk_bytes <= 0:
        raise MergeError("rank, max_shard_bytes and chunk_bytes must be > 0")
    from coordinator.rounds.adapter import base_layout

    entries = base_tensors(Path(base_dir))
    pairs = lora_pairs(state)
    layout = layout if layout is not None else base_layout(Path(base_dir))
    names = {e.name for e in entries}

    def in_checkpoint(name: str) -> str:
        # Some checkpoints (GPT-2's on the Hub) name tensors without the model's base prefix ("h.0.attn..." for
        # the module "transformer.h.0.attn..."); transformers loads either, so the merge accepts either.
        p = layout.base_prefix
        return name[len(p):] if name not in names and p and name.startswith(p) and name[len(p):] in names else name

    pairs = {in_checkpoint(n): v for n, v in pairs.items()}
    residual = {in_checkpoint(n): v for n, v in (residual or {}).items()}
    fan_in_fan_out = frozenset(in_checkpoint(n) for n in layout.fan_in_fan_out)
    untied = []
    for out_name, in_name in layout.tied:  # an adapter on a tied output projection unties it (module docstring)
        src = next((e for e in entries if e.name == in_checkpoint(in_name)), None)
        if out_name not in names and (out_name in pairs or out_name in residual) and src is not None:
            entries.append(_TensorEntry(out_name, src.dtype, src.shape, src.file, src.start, src.nbytes))
            untied.append(out_name)
    names = {e.name for e in entries}
    missing = sorted(set(pairs) - names)
    if missing:
        raise MergeError(f"adapter targets {len(missing)} module(s) the base checkpoint has no tensor for, e.g. "
                         f"{missing[0]!r}")
    shapes = {e.name: e.shape for e in entries}
    for name, r in residual.items():
        if shapes.get(name) != tuple(r.shape):
            raise MergeError(f"base residual {name!r} of shape {tuple(r.shape)} matches no base tensor "
                             f"(base shape: {shapes.get(name)})")
    out_dir = Path(out_dir)
    copy_side_files(Path(base_dir), out_dir)
    shards = _plan_shards(entries, max_shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    if untied:
        config = json.loads((out_dir / "config.json").read_text())
        config["tie_word_embeddings"] = False
        (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        log.info("[Merge] the adapter changes the tied output projection: merged model has its own %s", untied[0])
    stream = _merged_stream(entries, pairs, alpha / rank, residual, fan_in_fan_out, chunk_bytes)
    for shard, fname in zip(shards, files, strict=True):
        with open(out_dir / fname, "wb") as out:
            out.write(_header_bytes(shard))
            for want in shard:
                e, chunks = next(stream)
                assert e is want
                written = 0
                for chunk in chunks:
                    out.write(chunk)
                    written += len(chunk)
                if written != e.nbytes:
                    raise MergeError(f"{e.name!r}: wrote {written} bytes, the base holds {e.nbytes}")
                weight_map[e.name] = fname
    total = sum(e.nbytes for e in entries)
    (out_dir / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2, sort_keys=True) + "\n")
    return MergeResult(out_dir, tuple(files), tuple(sorted(pairs)), total)


def merge_adapter(base_dir: Path, spec: pb.AdapterSpec, state: Mapping[str, torch.Tensor], out_dir: Path,
                  max_shard_bytes: int = 2 << 30, residual: Mapping[str, torch.Tensor] | None = None) -> MergeResult | None:
    """Merge layer by layer (:func:`merge_to_dir`); fall back to PEFT's in-memory merge if the checkpoint's tensor
    names do not follow the model's modules (returns None then, after a warning)."""
    try:
        return merge_to_dir(base_dir, state, rank=spec.rank, alpha=spec.alpha, out_dir=out_dir,
                            max_shard_bytes=max_shard_bytes, residual=residual)
    except MergeError as e:
        log.warning("[Merge] layer-by-layer merge not possible (%s); merging in memory with PEFT", e)
    from coordinator.rounds.adapter import peft_model_with

    shutil.rmtree(out_dir, ignore_errors=True)
    merged = peft_model_with(Path(base_dir), spec, dict(state)).merge_and_unload()
    from fedcommon.models import stored_dtype

    merged = merged.to(stored_dtype(Path(base_dir)) or torch.float32)  # written in the base's own dtype
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for name, r in (residual or {}).items():
            if name not in params or tuple(params[name].shape) != tuple(r.shape):
                raise MergeError(f"base residual {name!r} matches no weight of the base model")
            params[name].add_(r.to(params[name].dtype))
    merged.save_pretrained(out_dir, max_shard_size=max_shard_bytes)
    copy_side_files(Path(base_dir), out_dir, only_tokenizer=True)
    return None
