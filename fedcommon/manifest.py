"""Model manifests: the SHA-256 of every file that makes a model, and one hash that pins them all.

Only the files that decide what the model computes are pinned: weights (``*.safetensors``, ``*.bin`` and their
index), ``config.json``, ``generation_config.json``, the tokenizer files and chat templates. A hub download also
holds ``README.md``, ``.gitattributes``, images and licence texts; a site that edits or lacks those still trains the
same model, so they are ignored rather than turned into a refusal nobody can act on.

The manifest hash travels in every task and every update envelope, so a site can prove it trained on exactly the
base model the federation agreed on, and the coordinator can refuse an update made against any other.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "fedbridge-manifest.json"
_CHUNK = 1 << 20
# File-name patterns (matched on the name, in any sub-folder) of the files that make a model.
MODEL_FILE_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json",  # weights and their shard index
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "*.model", "*.tiktoken",  # BPE/WordPiece/SentencePiece/tiktoken
    "chat_template.jinja", "chat_template.json", "*.jinja",  # transformers 5 also writes additional_chat_templates/
)


def is_model_file(rel: str) -> bool:
    """Whether the file at relative POSIX path ``rel`` is one the manifest pins (see ``MODEL_FILE_PATTERNS``)."""
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(name, pat) for pat in MODEL_FILE_PATTERNS)


class ManifestMismatch(ValueError):
    """A model directory does not match its manifest (names the files that differ)."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """Hashes of the model files of a model directory (see ``MODEL_FILE_PATTERNS``; the manifest excluded).

    Attributes:
        files: Relative POSIX path -> hex SHA-256.
    """

    files: dict[str, str]

    @property
    def sha256(self) -> str:
        """One hash over the sorted (path, hash) pairs: the base model's identity."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def canonical_json(self) -> str:
        return json.dumps({"files": dict(sorted(self.files.items()))}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def of_dir(cls, model_dir: str | Path) -> Manifest:
        """Hash every model file under ``model_dir`` (skipping the manifest, hidden files and non-model files)."""
        root = Path(model_dir)
        if not root.is_dir():
            raise ManifestMismatch(f"model directory {root} does not exist")
        files = {}
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and rel != MANIFEST_NAME and is_model_file(rel) and \
                    not any(part.startswith(".") for part in p.relative_to(root).parts):
                files[rel] = sha256_file(p)
        if not files:
            raise ManifestMismatch(f"model directory {root} holds no model files (weights, config.json, tokenizer)")
        return cls(files)

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read a manifest JSON file (``{"files": {...}}``)."""
        p = Path(path)
        try:
            data = json.loads(p.read_text())
            files = data["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ManifestMismatch(f"{p}: not a readable manifest ({e})") from e
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise ManifestMismatch(f"{p}: field 'files' must map relative paths to hex SHA-256 strings")
        return cls(dict(files))

    def save(self, model_dir: str | Path) -> Path:
        """Write the manifest into ``model_dir`` and return its path."""
        p = Path(model_dir) / MANIFEST_NAME
        p.write_text(json.dumps({"files": dict(sorted(self.files.items())), "sha256": self.sha256}, indent=1) + "\n")
        return p


def verify_model_dir(model_dir: str | Path, expected_sha256: str, pinned_by: str = "the task") -> Manifest:
    """Check that ``model_dir`` hashes to ``expected_sha256``; return its manifest.

    Args:
        model_dir: The base model's directory.
        expected_sha256: The manifest hash it must have.
        pinned_by: Who pinned that hash, for the message ("the task", "its fedbridge-manifest.json").

    Raises:
        ManifestMismatch: naming the missing, extra or changed files when the directory's manifest on disk says
            what was expected, or the two hashes otherwise.
    """
    actual = Manifest.of_dir(model_dir)
    if actual.sha256 == expected_sha256:
        return actual
    detail = ""
    recorded = Path(model_dir) / MANIFEST_NAME
    if recorded.exists():
        want = Manifest.load(recorded)
        changed = sorted(k for k in want.files.keys() & actual.files.keys() if want.files[k] != actual.files[k])
        missing = sorted(want.files.keys() - actual.files.keys())
        extra = sorted(actual.files.keys() - want.files.keys())
        parts = [f"{what}: {names}" for what, names in (("changed", changed), ("missing", missing),
                                                          ("unexpected model files", extra)) if names]
        detail = f" ({', '.join(parts)})" if parts else ""
    raise ManifestMismatch(f"base model at {model_dir} has manifest hash {actual.sha256[:16]}…, "
                           f"{pinned_by} pins {expected_sha256[:16]}…{detail}")
