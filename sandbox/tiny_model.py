"""Build the tiny Llama-shaped chat model that the tests and the demo train on, with no download.

The model is a normal Hugging Face directory (``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` with a ChatML chat template, ``generation_config.json``) plus a fedbridge manifest, so
every code path that loads a hub model or a local path loads it unchanged. The tokenizer is a ByteLevel BPE trained
with ``tokenizers`` on text generated here (the synthetic sites' questions and answers plus English-like filler), so
the demo text tokenizes compactly. Weights are random (``torch.manual_seed(config.seed)``): LoRA on top of them still
learns the synthetic facts, which is all the demo needs.

Builds are cached under ``<cache root>/tiny-models/<config_hash>`` and are atomic (built in a temporary folder, then
renamed), so parallel test processes may race safely. The same config builds byte-identical files, hence the same
manifest hash, on every run of the same library versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedcommon.manifest import MANIFEST_NAME, Manifest, ManifestMismatch, verify_model_dir
from sandbox.synthetic import vocabulary_text

logger = logging.getLogger(__name__)

# Bump whenever the built files would change for the same config (filler text, init, chat template, save format);
# the synthetic sites' text is hashed into the cache key by itself.
BUILDER_VERSION = "1"

# Std of the random weights. With Llama's default 0.02 the (tied) embeddings are so short that, behind the final
# RMSNorm, no logit exceeds about 0.02 * hidden_size = 5: LoRA, which never touches embeddings or norms, then learns
# the right argmax but the loss floors near log(vocab) - 5 = 3.4. Measured on the synthetic sites (LoRA r=16,
# 100 steps, lr 2e-3): 0.02 left held-out loss at 4.4; 0.05 took it from about 8.7 to 0.04-0.34 on the five sites,
# with 79 of 80 held-out answers right; 0.1 overfit (train loss 0.001, held-out 0.05-0.9).
INIT_STD = 0.05

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)  # ids 0, 1, 2

# ChatML. The assistant's reply AND its <|im_end|> sit inside {% generation %}, so TRL's assistant_only_loss trains
# the model to stop; the newline after <|im_end|> belongs to no one.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- generation -%}{{ message['content'] + '<|im_end|>' }}{%- endgeneration -%}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_FILLER_TEXT = (
    "the a an and or but if then so because when while of to in on at by for with from into over under about "
    "after before between through during without within is are was were be been being has have had do does did "
    "can could will would should may might must shall it its this that these those there here what which who whom "
    "whose where why how all any each every some many much more most few less least one two three four five six "
    "seven eight nine ten first second last next new old good great small large long short high low early late "
    "young big little same other own right left true false open close city country river mountain forest sea "
    "island road house school market people person man woman child friend family group team world life time year "
    "day night week month morning evening water fire air earth light sound colour name word number answer question "
    "story book letter code list table paper map car ship train bird fish tree flower stone garden field village "
    "king queen doctor teacher farmer builder maker make made build built find found live lives lived know known "
    "think thought say said tell told ask asked give gave take took go went come came see saw look looked use used "
    "work worked call called try tried need needed want wanted help helped show showed play played move moved "
    "write wrote read reverse add plus equals invented inventor capital habitat describe compute spell backwards "
    "order place home seat government whom created device skill fact data model site round train training private "
    "shared learn learned result value sum total count again also only very just still even never always often "
    "today yesterday tomorrow please thank thanks yes no not hello goodbye"
)
_FILLER_WORDS = tuple(_FILLER_TEXT.split())


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape and seed of the tiny model. Defaults give about 4.2 M parameters and a 17 MB checkpoint."""

    vocab_size: int = 4096
    """Tokenizer vocabulary and embedding rows (the BPE is trained up to this size)."""
    hidden_size: int = 256
    """Width of the residual stream."""
    intermediate_size: int = 688
    """Width of each MLP's hidden layer."""
    num_hidden_layers: int = 4
    """Number of decoder blocks."""
    num_attention_heads: int = 4
    """Query heads per block; must divide ``hidden_size`` into an even head size (RoPE rotates pairs)."""
    num_key_value_heads: int = 4
    """Key/value heads per block (grouped-query attention when fewer than the query heads); must divide them."""
    max_position_embeddings: int = 512
    """Longest sequence the model and tokenizer accept."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the output head (saves ``vocab_size * hidden_size`` parameters)."""
    seed: int = 0
    """Seeds the random weight initialisation (and nothing else: the tokenizer is deterministic by itself)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"TinyModelConfig.{f.name} must be an int, got {type(value).__name__}")
        positive = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TinyModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        min_vocab = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens
        if self.vocab_size < min_vocab:
            raise ValueError(f"TinyModelConfig.vocab_size must be >= {min_vocab}, got {self.vocab_size}")
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"TinyModelConfig.hidden_size ({self.hidden_size}) must split into "
                             f"{self.num_attention_heads} heads of even size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"TinyModelConfig.num_key_value_heads ({self.num_key_value_heads}) must divide "
                             f"num_attention_heads ({self.num_attention_heads})")
        if not isinstance(self.tie_word_embeddings, bool):
            raise TypeError("TinyModelConfig.tie_word_embeddings must be a bool")
        if self.seed < 0:
            raise ValueError(f"TinyModelConfig.seed must be >= 0, got {self.seed}")

    def config_hash(self) -> str:
        """First 16 hex digits of the SHA-256 of the canonical JSON of the fields and :data:`BUILDER_VERSION`.

        The SHA-256 of the synthetic sites' text is hashed in too: the tokenizer is trained on it, so an edit to
        ``sandbox/synthetic.py`` must not be served a cached model built from the old text.
        """
        corpus = hashlib.sha256(vocabulary_text().encode()).hexdigest()
        canonical = json.dumps({"builder_version": BUILDER_VERSION, "config": asdict(self), "corpus": corpus},
                               sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    """``$FEDBRIDGE_CACHE`` if set, else ``~/.cache/fedbridge``."""
    env = os.environ.get("FEDBRIDGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fedbridge"


def _training_text() -> list[str]:
    """The tokenizer corpus: the synthetic sites' text (weighted up) and seeded English-like filler."""
    # The demo's text, repeated so its names win merges over filler pairs, and the ChatML role lines.
    lines = vocabulary_text().splitlines() * 60 + ["system\n", "user\n", "assistant\n"] * 500
    rng = random.Random(1234)
    # Made-up words from English-like syllables fill the vocabulary up to vocab_size with whole-word merges.
    onsets = ("b", "bl", "br", "c", "ch", "cl", "cr", "d", "dr", "f", "fl", "fr", "g", "gl", "gr", "h", "j", "k",
              "l", "m", "n", "p", "pl", "pr", "qu", "r", "s", "sh", "sl", "sp", "st", "str", "t", "th", "tr", "v",
              "w", "wh", "y", "z")
    vowels = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "ie")
    codas = ("", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck", "ng", "rt", "sh")
    made_up = sorted({"".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                              for _ in range(rng.randint(1, 3))) for _ in range(3000)})
    vocab = list(_FILLER_WORDS) * 4 + made_up
    for _ in range(12000):
        words = [rng.choice(vocab) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2000)))
        sentence = " ".join(words)
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice(".?!,;:"))
    return lines


def train_bpe(vocab_size: int, special_tokens: list[str]):  # -> tokenizers.Tokenizer
    """A ByteLevel BPE trained on the local corpus (no prefix space, untrimmed offsets: they feed the assistant mask).

    Shared by the house tiny model and the tiny real-family bases (:mod:`sandbox.families`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_text(), trainer=trainer)
    return tok


def _build_tokenizer(config: TinyModelConfig):  # -> transformers.PreTrainedTokenizerFast
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=train_bpe(config.vocab_size, list(SPECIAL_TOKENS)),
                                   eos_token=IM_END, pad_token=PAD_TOKEN, additional_special_tokens=[IM_START],
                                   model_max_length=config.max_position_embeddings)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_into(config: TinyModelConfig, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer(config)
    if len(tokenizer) > config.vocab_size:
        raise AssertionError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size {config.vocab_size}")
    pad_id, eos_id = tokenizer.convert_tokens_to_ids([PAD_TOKEN, IM_END])
    llama = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=pad_id, eos_token_id=eos_id,
        pad_token_id=pad_id, initializer_range=INIT_STD, dtype="float32",
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(llama).eval()
    model.float()  # weights are created in torch's default dtype, which a caller may have changed
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(out, safe_serialization=True)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, where older loaders look.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    Manifest.of_dir(out).save(out)


def _is_valid(model_dir: Path) -> bool:
    manifest = model_dir / MANIFEST_NAME
    if not manifest.is_file():
        return False
    try:
        verify_model_dir(model_dir, Manifest.load(manifest).sha256)
    except ManifestMismatch:
        return False
    return True


def build_tiny_model(config: TinyModelConfig = TinyModelConfig(), cache_dir: str | Path | None = None) -> Path:
    """Return the directory of the tiny model for ``config``, building it on a cache miss.

    Args:
        config: The model's shape and seed.
        cache_dir: Cache root; defaults to :func:`default_cache_root`. The model lives under
            ``<root>/tiny-models/<config.config_hash()>``.

    Returns:
        A Hugging Face model directory with ``fedbridge-manifest.json``. A cached directory is returned untouched
        when its files still match its manifest; otherwise it is rebuilt.
    """
    root = (Path(cache_dir) if cache_dir is not None else default_cache_root()) / "tiny-models"
    return install_cached(root, config.config_hash(), lambda out: _build_into(config, out))


def install_cached(root: Path, key: str, build: Callable[[Path], None]) -> Path:
    """Return ``root/key``, building it with ``build(tmp_dir)`` and renaming it into place on a cache miss.

    A directory whose files still match its manifest is returned untouched; ``build`` must write the manifest.
    Parallel builders may race: the first complete rename wins and the others use it.
    """
    final = root / key
    if _is_valid(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    logger.info("[tiny_model.build] building %s into %s", key, final)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model directory
        for _ in range(3):
            try:
                os.rename(tmp, final)  # atomic; fails if another process already put a non-empty dir there
                return final
            except OSError:
                if _is_valid(final):  # another process won the race with a good build: use theirs
                    return final
                # A corrupt or partial dir from some crash: move it aside atomically, then retry ours.
                stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=root))
                with contextlib.suppress(OSError):  # someone else moved or replaced it meanwhile
                    os.rename(final, stale / "model")
                shutil.rmtree(stale, ignore_errors=True)
        raise RuntimeError(f"could not install the tiny model at {final}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

app = typer.Typer(help="Build the tiny local model used by the tests and the demo (nothing is downloaded).",
                  no_args_is_help=True)
_D = TinyModelConfig()


@app.callback()
def _group() -> None:
    """Tiny local model for tests and the demo."""  # a callback keeps `build` a sub-command even when run alone


@app.command("build")
def build(
    vocab_size: Annotated[int, typer.Option(help="Tokenizer vocabulary and embedding rows.")] = _D.vocab_size,
    hidden_size: Annotated[int, typer.Option(help="Width of the residual stream.")] = _D.hidden_size,
    intermediate_size: Annotated[int, typer.Option(help="Width of each MLP.")] = _D.intermediate_size,
    num_hidden_layers: Annotated[int, typer.Option(help="Decoder blocks.")] = _D.num_hidden_layers,
    num_attention_heads: Annotated[int, typer.Option(help="Query heads.")] = _D.num_attention_heads,
    num_key_value_heads: Annotated[int, typer.Option(help="Key/value heads.")] = _D.num_key_value_heads,
    max_position_embeddings: Annotated[int, typer.Option(help="Longest sequence.")] = _D.max_position_embeddings,
    tie_word_embeddings: Annotated[bool, typer.Option(help="Tie input and output embeddings.")] = (
        _D.tie_word_embeddings),
    seed: Annotated[int, typer.Option(help="Weight-initialisation seed.")] = _D.seed,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache root (default $FEDBRIDGE_CACHE or "
                                                        "~/.cache/fedbridge).")] = None,
) -> None:
    """Build (or find in the cache) the tiny model and print its directory and manifest hash."""
    console = Console()
    try:
        config = TinyModelConfig(vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
                                 num_key_value_heads, max_position_embeddings, tie_word_embeddings, seed)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    with console.status("building the tiny model"):
        model_dir = build_tiny_model(config, cache_dir)
    manifest_hash = Manifest.load(model_dir / MANIFEST_NAME).sha256
    console.print(f"[bold]model dir[/bold]      {model_dir}", soft_wrap=True)
    console.print(f"[bold]manifest hash[/bold]  {manifest_hash}", soft_wrap=True)
