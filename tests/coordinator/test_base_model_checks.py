"""Coordinator-start and ``fedbridge-admin init`` checks of the base: LoRA target names and the chat template."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.basemodel import BaseModelError, template_pin
from fedcommon.chat import template_sha256
from fedcommon.models import TargetModuleError, check_target_modules
from fedcommon.tomlconfig import dumps
from sandbox.families import build_family_model
from sandbox.localfed import enrol_by_csr

ROOT = Path(__file__).resolve().parents[2]
# What a federation would ship for GPT-2 (which has none): turns ended by its only special token.
GPT2_TEMPLATE = ("{% for m in messages %}{{ m['role'] + '\\n' + m['content'] + '<|endoftext|>' + '\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ 'assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    cache = os.environ.get("FEDBRIDGE_CACHE") or tmp_path_factory.mktemp("fedbridge-cache")
    return lambda name: build_family_model(name, cache_dir=cache)


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {"COLUMNS": "300", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "coordinator", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env=env)


def _federation_toml(tmp_path: Path, base: Path, **tables: dict) -> Path:
    cfg = {"federation_id": "f", "base_model": str(base), "state_dir": "state", "registry_dir": "published",
           "tls": {"ca": "ca.pem", "cert": "server.pem", "key": "server.key"}, **tables}
    path = tmp_path / "federation.toml"
    path.write_text(dumps(cfg))
    return path


def test_resolution_reads_no_weights_and_lists_what_exists(family_dir: Callable[[str], Path], tmp_path: Path) -> None:
    base = tmp_path / "gpt2"
    shutil.copytree(family_dir("gpt2"), base)
    (base / "model.safetensors").write_bytes(b"not weights")  # the meta-device build never opens them
    assert check_target_modules(base, ["all-linear"]) == ["c_attn", "c_proj", "c_fc"]
    assert check_target_modules(base, ["c_attn"]) == ["c_attn"]
    with pytest.raises(TargetModuleError) as e:
        check_target_modules(base, ["q_proj", "c_attn"])
    assert "'q_proj' matches no module" in str(e.value) and "c_attn, c_proj, c_fc" in str(e.value)


def test_serve_refuses_unknown_targets_in_one_line(family_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """GPT-2 has no q_proj/v_proj: one clear line through the real CLI, not PEFT's traceback."""
    toml = _federation_toml(tmp_path, family_dir("gpt2"), lora={"target_modules": ["q_proj", "v_proj"]})
    r = _cli("serve", "-c", toml)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out
    line = " ".join(out.split())
    assert "base model error: field 'lora.target_modules': 'q_proj', 'v_proj' match no module" in line
    assert "c_attn, c_proj, c_fc" in line


def test_init_pins_the_supplied_template_and_serve_refuses_a_base_without_one(
        family_dir: Callable[[str], Path], tmp_path: Path) -> None:
    gpt2 = family_dir("gpt2")
    r = _cli("init", "--dir", tmp_path / "nofed", "--federation-id", "x", "--base-model", gpt2)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert "has no chat template" in " ".join((r.stdout + r.stderr).split())
    assert not (tmp_path / "nofed-ca" / "ca.key").exists()  # refused before anything was written
    template = tmp_path / "gpt2.jinja"
    template.write_text(GPT2_TEMPLATE)
    r = _cli("init", "--dir", tmp_path / "fed", "--federation-id", "x", "--base-model", gpt2,
             "--chat-template", template)
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads((tmp_path / "fed" / "manifest.json").read_text())
    assert manifest["chat_template_sha256"] == template_sha256(GPT2_TEMPLATE)
    toml = (tmp_path / "fed" / "federation.toml").read_text()
    assert 'chat_template = "chat_template.jinja"' in toml and '"all-linear"' in toml
    assert (tmp_path / "fed" / "chat_template.jinja").read_text() == GPT2_TEMPLATE  # the federation's own copy
    kit = enrol_by_csr(tmp_path / "fed", tmp_path / "fed-ca", tmp_path / "s1-kit", "s1", "EU-DE")
    assert (kit / "chat_template.jinja").read_text() == GPT2_TEMPLATE  # preflight's default template


def test_template_pin(family_dir: Callable[[str], Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    qwen = family_dir("qwen2")
    own = template_pin(qwen, None)
    assert own.text == "" and own.sha256 == template_sha256(AutoTokenizer.from_pretrained(qwen).chat_template)
    good = tmp_path / "good.jinja"
    good.write_text(GPT2_TEMPLATE)
    supplied = template_pin(family_dir("gpt2"), good)
    assert supplied.text == GPT2_TEMPLATE and supplied.sha256 == template_sha256(GPT2_TEMPLATE)
    bad = tmp_path / "bad.jinja"  # no end-of-turn token after a reply: the model would never learn to stop
    bad.write_text(GPT2_TEMPLATE.replace("'<|endoftext|>' + ", ""))
    with pytest.raises(BaseModelError, match=r"field 'model.chat_template' .*bad.jinja.*end-of-turn"):
        template_pin(family_dir("gpt2"), bad)
    assert template_pin(family_dir("gpt2"), None, mode="dpo").sha256 == ""  # string preference rows need none
