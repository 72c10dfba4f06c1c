"""The tiny model: a stock HF directory, deterministic, cached, and atomic to build."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcommon.manifest import MANIFEST_NAME, Manifest, verify_model_dir
from sandbox.tiny_model import (
    BUILDER_VERSION,
    TinyModelConfig,
    app,
    build_tiny_model,
)

# A few-hundred-parameter shape that builds in well under a second, for the cache mechanics.
SMALL = TinyModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)


def test_loads_with_stock_auto_classes(tiny_model_dir: Path) -> None:
    # Prepare
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Execute
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    # Assert
    n_params = sum(p.numel() for p in model.parameters())
    assert 2_000_000 < n_params < 10_000_000
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 4
    assert len(tokenizer) == 4096
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    # The demo's names are single tokens, so the synthetic facts are short to learn.
    assert len(tokenizer(" Zorvania").input_ids) == 1


def test_chat_template_renders_chatml_with_generation_prompt(tiny_model_dir: Path) -> None:
    # Prepare
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Zorvania?"}]

    # Execute
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # Assert
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nCapital of Zorvania?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_assistant_mask_covers_reply_and_end_of_turn(tiny_model_dir: Path) -> None:
    # Prepare: TRL's assistant_only_loss trains exactly the tokens this mask marks.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "Capital of Zorvania?"}, {"role": "assistant", "content": "Velmora."}]

    # Execute
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)

    # Assert
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(trained) == "Velmora.<|im_end|>"


def test_same_config_builds_the_same_manifest_hash(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    want = Manifest.load(tiny_model_dir / MANIFEST_NAME).sha256

    # Execute: a fresh build into another cache root
    other = build_tiny_model(TinyModelConfig(), cache_dir=tmp_path)

    # Assert
    assert other != tiny_model_dir
    assert other.name == tiny_model_dir.name == TinyModelConfig().config_hash()
    assert Manifest.of_dir(other).sha256 == want


def test_cache_hit_returns_the_directory_without_rebuilding(tmp_path: Path) -> None:
    # Prepare
    first = build_tiny_model(SMALL, cache_dir=tmp_path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}

    # Execute
    second = build_tiny_model(SMALL, cache_dir=tmp_path)

    # Assert
    assert second == first
    assert {p.name: p.stat().st_mtime_ns for p in second.iterdir()} == mtimes
    assert sorted(p.name for p in (tmp_path / "tiny-models").iterdir()) == [SMALL.config_hash()]


def test_corrupt_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    # Prepare
    model_dir = build_tiny_model(SMALL, cache_dir=tmp_path)
    good = Manifest.load(model_dir / MANIFEST_NAME).sha256
    (model_dir / "config.json").write_text("{}")

    # Execute
    rebuilt = build_tiny_model(SMALL, cache_dir=tmp_path)

    # Assert
    assert rebuilt == model_dir
    verify_model_dir(rebuilt, good)
    assert sorted(p.name for p in (tmp_path / "tiny-models").iterdir()) == [SMALL.config_hash()]


def test_concurrent_builds_agree_and_leave_no_temp_dirs(tmp_path: Path) -> None:
    # Prepare
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(build_tiny_model(SMALL, cache_dir=tmp_path)))
               for _ in range(3)]

    # Execute
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # Assert
    assert len(results) == 3 and len(set(results)) == 1
    verify_model_dir(results[0], Manifest.load(results[0] / MANIFEST_NAME).sha256)
    assert sorted(p.name for p in (tmp_path / "tiny-models").iterdir()) == [SMALL.config_hash()]


def test_config_hash_is_16_hex_and_tracks_every_field() -> None:
    # Prepare
    base = TinyModelConfig()

    # Execute
    hashes = {base.config_hash(), TinyModelConfig(seed=1).config_hash(),
              TinyModelConfig(tie_word_embeddings=False).config_hash(), TinyModelConfig(vocab_size=2048).config_hash()}

    # Assert
    assert re.fullmatch(r"[0-9a-f]{16}", base.config_hash())
    assert len(hashes) == 4
    assert BUILDER_VERSION  # part of the hash: bumping it invalidates every cached build


def test_config_hash_tracks_the_tokenizer_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    import sandbox.tiny_model as tiny_model

    before = TinyModelConfig().config_hash()
    monkeypatch.setattr(tiny_model, "vocabulary_text", lambda: "What is the capital of Elsewhere?\n")

    # Execute
    after = TinyModelConfig().config_hash()

    # Assert
    assert after != before


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden_size": 250}, "heads of even size"),
    ({"num_key_value_heads": 3}, "must divide"),
    ({"vocab_size": 100}, "vocab_size must be >= 259"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be >= 1"),
    ({"seed": -1}, "seed must be >= 0"),
])
def test_config_rejects_impossible_shapes(kwargs: dict, message: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        TinyModelConfig(**kwargs)


def test_config_rejects_wrong_types() -> None:
    # Execute / Assert
    with pytest.raises(TypeError, match="hidden_size must be an int"):
        TinyModelConfig(hidden_size=256.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tie_word_embeddings must be a bool"):
        TinyModelConfig(tie_word_embeddings=1)  # type: ignore[arg-type]


def test_cli_build_prints_dir_and_manifest_hash(tmp_path: Path) -> None:
    # Prepare
    args = ["build", "--vocab-size", "512", "--hidden-size", "32", "--intermediate-size", "64",
            "--num-hidden-layers", "1", "--num-attention-heads", "2", "--num-key-value-heads", "1",
            "--max-position-embeddings", "64", "--cache-dir", str(tmp_path)]

    # Execute
    result = CliRunner().invoke(app, args)

    # Assert
    assert result.exit_code == 0, result.output
    model_dir = tmp_path / "tiny-models" / SMALL.config_hash()
    assert str(model_dir) in result.output
    assert Manifest.of_dir(model_dir).sha256 in result.output
