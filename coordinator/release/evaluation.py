"""Shared evaluation: merge the global adapter into the base, run EvalScope on it, and read back every score.

Offline, the benchmarks are EvalScope custom datasets (``general_mcq``: ``<subset>_val.jsonl``; ``general_qa``:
``<subset>.jsonl``) read from ``local_path``. Named benchmarks (mmlu, ceval, gsm8k, ...) are for coordinators that
can reach their dataset hub; :func:`check_benchmarks` refuses them at start when the hub cannot be reached, with a
pointer to a local-dataset configuration.

A score that could not be computed is an error here, never a 0: EvalScope records a metric that failed on a sample
(e.g. BLEU without NLTK's ``punkt_tab``) in the sample's review and scores it 0, so :func:`run_evalscope` reads the
reviews and raises :class:`EvaluationError` naming the metric and the cause. BLEU therefore needs ``punkt_tab``:
installed, or trained here on the local QA text (``evaluation.punkt_dir``), else the coordinator refuses to start.

EvalScope is a heavy optional dependency (the ``eval`` extra) and is imported only when an evaluation runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from coordinator.config import LOCAL_BENCHMARKS, BenchmarkSpec, EvalSpec

if TYPE_CHECKING:  # torch and the protocol are heavy; the demo imports this module for is_due only
    import torch

    from protos.fedbridge.v1 import federation_service_pb2 as pb

log = logging.getLogger(__name__)

MODEL_ID = "merged"
QA_PROMPT = "{question}"
HUB_HOSTS = {"modelscope": "www.modelscope.cn", "huggingface": "huggingface.co"}
HUB_ENDPOINT_ENV = {"modelscope": "MODELSCOPE_DOMAIN", "huggingface": "HF_ENDPOINT"}  # mirrors the libraries honour
_OFFLINE_ENV = {"modelscope": ("FEDBRIDGE_OFFLINE",),
                "huggingface": ("FEDBRIDGE_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
# Credit a multiple-choice reply only for an explicit "ANSWER: X" (the last one); anything else maps to no answer.
STRICT_CHOICE_FILTER = {"regex": {"regex_pattern": r"(?i:answer)\s*[:：]\s*\**\s*\(?([A-J])\b", "group_select": -1,
                                  "fallback": "[no answer]"}}


class EvaluationError(RuntimeError):
    """An evaluation cannot run, or produced a score that was not really computed."""


@dataclass(frozen=True)
class BenchmarkResult:
    """The scores of one benchmark.

    Attributes:
        name: Benchmark name.
        primary_metric: Name of the benchmark's main metric (e.g. ``acc``, ``Rouge-L-R``).
        score: Value of the main metric over all samples.
        num_samples: Samples scored.
        metrics: Every metric over all samples.
        subsets: Main metric per subset: ``{subset: (score, num_samples)}``.
    """

    name: str
    primary_metric: str
    score: float
    num_samples: int
    metrics: dict[str, float]
    subsets: dict[str, tuple[float, int]]

    def rows(self) -> dict[str, tuple[float, int]]:
        """Rows for :meth:`coordinator.rounds.store.Store.put_eval_run`: ``score``, each metric, ``subset/<name>``."""
        out = {"score": (self.score, self.num_samples)}
        out.update({k: (v, self.num_samples) for k, v in self.metrics.items()})
        out.update({f"subset/{s}": v for s, v in self.subsets.items()})
        return out


@dataclass(frozen=True)
class EvalReport:
    """One evaluation of a merged model."""

    results: dict[str, BenchmarkResult]
    seconds: float
    work_dir: Path

    def scores(self) -> dict[str, float]:
        return {name: r.score for name, r in self.results.items()}

    def store_rows(self) -> dict[str, dict[str, tuple[float, int]]]:
        return {name: r.rows() for name, r in self.results.items()}


def is_due(round: int, total_rounds: int, every_k_rounds: int) -> bool:
    """Whether round ``round``'s output is evaluated: every k-th round, and always the last one."""
    return round % every_k_rounds == 0 or round == total_rounds


# -- checks before anything runs ------------------------------------------------------------------------------------
def hub_reachable(hub: str, timeout: float = 3.0) -> bool:
    """Whether the dataset hub answers a TCP connect (False at once when an offline flag is set)."""
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_ENV[hub]):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; a failure then surfaces when EvalScope fetches the dataset
    host = urlparse(os.environ.get(HUB_ENDPOINT_ENV[hub], "")).hostname or os.environ.get(HUB_ENDPOINT_ENV[hub], "")
    try:
        socket.create_connection((host or HUB_HOSTS[hub], 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def offline_hint(name: str) -> str:
    return (f"Offline, evaluate on local datasets instead: in federation.toml add an [[evaluation.benchmarks]] entry "
            f"with name = \"general_mcq\" and local_path = a folder of <subset>_val.jsonl rows "
            f"{{id, question, A, B, C, D, answer}}, or name = \"general_qa\" with <subset>.jsonl rows "
            f"{{question, answer}} (sandbox/benchmarks.py writes such a pair), or set local_path to a downloaded copy "
            f"of {name!r}.")


def check_benchmarks(spec: EvalSpec, reachable: Callable[[str], bool] = hub_reachable) -> None:
    """Refuse, before the federation starts, an evaluation that cannot run or would score silently.

    Raises:
        EvaluationError: A local dataset folder is missing or lacks a subset file; a named benchmark's hub is not
            reachable and no local copy is configured; BLEU is asked for without NLTK ``punkt_tab``.
    """
    for b in spec.benchmarks:
        if b.local_path is not None and not Path(b.local_path).is_dir():
            raise EvaluationError(f"benchmark {b.name!r}: local_path {b.local_path} is not a folder")
        if b.name in LOCAL_BENCHMARKS:
            assert b.local_path is not None  # BenchmarkSpec checks it
            for s in b.subsets:
                want = b.local_path / (f"{s}_val.jsonl" if b.name == "general_mcq" else f"{s}.jsonl")
                if not want.exists():
                    raise EvaluationError(f"benchmark {b.name!r}: subset {s!r} has no file {want}")
        elif b.local_path is None and not reachable(spec.dataset_hub):
            raise EvaluationError(f"benchmark {b.name!r} needs its dataset from {HUB_HOSTS[spec.dataset_hub]} "
                                  f"({spec.dataset_hub}), which this coordinator cannot reach. " + offline_hint(b.name))
    ensure_punkt(spec)


def _wants_bleu(spec: EvalSpec) -> list[BenchmarkSpec]:
    return [b for b in spec.benchmarks if b.name == "general_qa" and "BLEU" in b.metrics]


def ensure_punkt(spec: EvalSpec) -> None:
    """Make NLTK's ``punkt_tab`` available for BLEU (train it locally into ``punkt_dir`` if asked), or refuse."""
    bleu = _wants_bleu(spec)
    if not bleu:
        return
    import nltk

    if spec.punkt_dir is not None:
        root = str(Path(spec.punkt_dir).resolve())
        if root not in nltk.data.path:
            nltk.data.path.insert(0, root)
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return
    except LookupError:
        if spec.punkt_dir is None:
            raise EvaluationError(
                "BLEU needs NLTK's 'punkt_tab' tokenizer data, which is not installed; offline, EvalScope would score "
                "BLEU 0 for every answer. Set evaluation.punkt_dir to a folder to train Punkt there on the local QA "
                "text, install punkt_tab into $NLTK_DATA, or remove BLEU from the benchmark's metrics.") from None
    from nltk.tokenize.punkt import PunktTrainer, save_punkt_params

    text = []
    for b in bleu:
        assert b.local_path is not None
        for f in sorted(Path(b.local_path).glob("*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                row = json.loads(line) if line.strip() else {}
                text += [str(row.get(k, "")) for k in ("question", "query", "answer", "response")]
    trainer = PunktTrainer()
    trainer.train(" ".join(t for t in text if t), finalize=True)
    target = Path(spec.punkt_dir) / "tokenizers" / "punkt_tab"  # type: ignore[arg-type]
    target.mkdir(parents=True, exist_ok=True)
    save_punkt_params(trainer.get_params(), dir=str(target / "english"))
    nltk.data.find("tokenizers/punkt_tab/english/")
    log.info("[Evaluation] trained NLTK Punkt on %d local QA strings into %s", len(text), target)


# -- running EvalScope ----------------------------------------------------------------------------------------------
def _dataset_args(b: BenchmarkSpec) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if b.local_path is not None:
        args["local_path"] = str(b.local_path)
    if b.subsets:
        args["subset_list"] = list(b.subsets)
    if b.name == "general_mcq":
        from evalscope.utils.multi_choices import MultipleChoiceTemplate

        args["prompt_template"] = b.prompt_template or MultipleChoiceTemplate.SINGLE_ANSWER
        if b.strict_choice_parsing:
            args["filters"] = STRICT_CHOICE_FILTER
    elif b.name == "general_qa":
        args["prompt_template"] = b.prompt_template or QA_PROMPT
        args["metric_list"] = list(b.metrics or ("Rouge",))
    elif b.prompt_template:
        args["prompt_template"] = b.prompt_template
    return args


def api_key(spec: EvalSpec) -> str:
    """The endpoint's API key, read from the environment variable ``spec.api_key_env`` names (``EMPTY``: none).

    Raises:
        EvaluationError: The variable is named but not set.
    """
    if not spec.api_key_env:
        return "EMPTY"
    key = os.environ.get(spec.api_key_env, "")
    if not key:
        raise EvaluationError(f"evaluation.api_key_env names {spec.api_key_env!r}, which is not set in the "
                              "coordinator's environment")
    return key


def task_config(spec: EvalSpec, model_dir: Path, work_dir: Path) -> dict[str, Any]:
    """The keyword arguments of EvalScope's ``TaskConfig`` for ``spec`` on the merged model in ``model_dir``.

    Endpoint mode scores the served model through EvalScope's ``openai_api`` model (``api_url``, ``api_key``,
    ``model`` = the served name); ``model_id`` names the reports either way, so both modes read back the same way.
    """
    if spec.mode == "endpoint":
        target: dict[str, Any] = {"model": spec.model_id, "eval_type": "openai_api", "api_url": spec.api_url,
                                  "api_key": api_key(spec)}
    else:
        target = {"model": str(model_dir), "eval_type": "llm_ckpt",
                  "model_args": {"device_map": spec.device_map, "precision": f"torch.{spec.precision}"}}
    return {
        **target, "model_id": MODEL_ID,
        "datasets": [b.name for b in spec.benchmarks],
        "dataset_args": {b.name: _dataset_args(b) for b in spec.benchmarks},
        "dataset_hub": spec.dataset_hub,
        "generation_config": {"max_tokens": spec.max_new_tokens, "do_sample": False},
        "limit": spec.limit or None,
        "work_dir": str(work_dir), "no_timestamp": True, "seed": 42,
    }


def _metric_key(identity: Mapping[str, Any]) -> str:
    name, dims = identity.get("name", ""), dict(identity.get("dimensions") or {})
    if name == "accuracy" and not dims:
        return "acc"
    if name == "rouge":
        stat = {"recall": "R", "precision": "P", "f1": "F"}.get(dims.get("statistic", ""), dims.get("statistic", ""))
        return f"Rouge-{'L' if dims.get('variant') == 'l' else dims.get('ngram')}-{stat}"
    if name == "bleu" and set(dims) == {"ngram"}:
        return f"bleu-{dims['ngram']}"
    return name + "".join(f".{k}={v}" for k, v in sorted(dims.items()))


def _finite(value: Any, what: str) -> float:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EvaluationError(f"{what} has no finite score ({value!r})")
    return float(value)


def parse_report(path: Path, name: str) -> BenchmarkResult:
    """Read EvalScope's ``reports/<model_id>/<benchmark>.json``; refuse incomplete or unavailable scores."""
    if not path.exists():
        raise EvaluationError(f"benchmark {name!r}: EvalScope wrote no report at {path}")
    d = json.loads(path.read_text())
    if d.get("primary_metric_unavailable_reason"):
        raise EvaluationError(f"benchmark {name!r}: primary metric unavailable: {d['primary_metric_unavailable_reason']}")
    ex = d.get("execution_summary") or {}
    if ex.get("errored") or ex.get("incomplete"):
        raise EvaluationError(f"benchmark {name!r}: {ex.get('errored', 0)} of {ex.get('requested', '?')} samples "
                              f"errored (incomplete={ex.get('incomplete')})")
    metrics: dict[str, float] = {}
    primary: tuple[str, float, int, dict[str, tuple[float, int]]] | None = None
    for m in d.get("metrics", []):
        key = _metric_key(m["identity"])
        metrics[key] = _finite(m.get("score"), f"benchmark {name!r} metric {key!r}")
        if m["identity"] == d.get("primary_metric_identity"):
            subsets = {s["name"]: (_finite(s["score"], f"benchmark {name!r} subset {s['name']!r}"), int(s["num"]))
                       for c in m.get("categories", []) for s in c.get("subsets", []) if not s.get("is_aggregate")}
            primary = (key, metrics[key], int(m.get("num", 0)), subsets)
    if primary is None:
        raise EvaluationError(f"benchmark {name!r}: the report has no primary metric")
    if primary[2] <= 0:
        raise EvaluationError(f"benchmark {name!r}: no sample was scored")
    return BenchmarkResult(name, primary[0], primary[1], primary[2], metrics, primary[3])


def check_reviews(reviews_dir: Path, name: str) -> None:
    """Raise if any sample of ``name`` carries a metric that EvalScope could not compute (and scored 0)."""
    for f in sorted(reviews_dir.glob(f"{name}_*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if '"metric_errors"' not in line:
                continue
            errors = (json.loads(line).get("sample_score", {}).get("score", {}).get("metadata") or {}).get("metric_errors")
            if errors:
                metric, why = next(iter(sorted(errors.items())))
                raise EvaluationError(f"benchmark {name!r}: metric {metric} could not be computed ({why.strip()[:300]}); "
                                      "EvalScope would have scored it 0")


def _import_evalscope() -> Any:
    """Import EvalScope, undoing its import-time ``logging.basicConfig(force=True)`` on the host's root logger."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        import evalscope
        import evalscope.run  # noqa: F401 - the module that configures logging on import
    except ImportError as e:
        raise EvaluationError(f"EvalScope is not installed ({e}); install the 'eval' extra: pip install 'fedbridge[eval]'") from e
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)
    return evalscope


@contextlib.contextmanager
def served(spec: EvalSpec, model_dir: Path) -> Iterator[None]:
    """Endpoint mode: serve ``model_dir`` with ``spec.serve_command`` until ``api_url`` lists ``model_id``; stop it
    after the block. Local mode: nothing to do.

    The server runs in its own process group, so stopping it also stops any workers it started (vLLM does).

    Raises:
        EvaluationError: The command cannot start, exits early, or does not serve ``model_id`` within
            ``ready_timeout_s``.
    """
    if spec.mode != "endpoint":
        yield
        return
    import signal
    import subprocess
    import urllib.error
    import urllib.request

    argv = [a.replace("{model_dir}", str(model_dir)) for a in spec.serve_command]
    log_path = Path(model_dir).parent / "serve.log"
    with open(log_path, "wb") as out:
        try:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            raise EvaluationError(f"evaluation.serve_command could not start ({e})") from None
    try:
        url = spec.api_url.rstrip("/") + "/models"
        headers = {"Authorization": f"Bearer {api_key(spec)}"}
        deadline = time.monotonic() + spec.ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise EvaluationError(f"evaluation.serve_command exited with code {proc.returncode} before serving "
                                      f"{spec.model_id!r} (its output: {log_path})")
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
                    ids = {m.get("id") for m in json.loads(r.read()).get("data", [])}
                if spec.model_id in ids:
                    break
            except (urllib.error.URLError, OSError, ValueError):
                pass  # not up yet
            if time.monotonic() > deadline:
                raise EvaluationError(f"the endpoint {url} did not list model {spec.model_id!r} within "
                                      f"{spec.ready_timeout_s:g} s (evaluation.ready_timeout_s; server output: {log_path})")
            time.sleep(0.25)
        log.info("[Evaluation] endpoint %s serves %s", spec.api_url, spec.model_id)
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run_evalscope(spec: EvalSpec, model_dir: Path, work_dir: Path) -> dict[str, BenchmarkResult]:
    """Run every benchmark of ``spec`` on the HF model in ``model_dir``; return checked scores by benchmark."""
    _import_evalscope()
    from evalscope import TaskConfig, run_task
    ensure_punkt(spec)
    named = [b.name for b in spec.benchmarks if b.name not in LOCAL_BENCHMARKS and b.local_path is None]
    try:
        with served(spec, model_dir):
            run_task(task_cfg=TaskConfig(**task_config(spec, model_dir, work_dir)))
    except EvaluationError:
        raise
    except Exception as e:
        if named and (isinstance(e, (OSError, ConnectionError, TimeoutError)) or "offline" in str(e).lower()):
            raise EvaluationError(f"benchmark(s) {named} could not fetch their dataset from {spec.dataset_hub}: "
                                  f"{type(e).__name__}: {e}. " + offline_hint(named[0] if named else "?")) from e
        raise EvaluationError(f"EvalScope failed: {type(e).__name__}: {e}") from e
    results = {}
    for b in spec.benchmarks:
        check_reviews(work_dir / "reviews" / MODEL_ID, b.name)
        results[b.name] = parse_report(work_dir / "reports" / MODEL_ID / f"{b.name}.json", b.name)
    return results


def evaluate_adapter(*, base_model: Path, spec: pb.AdapterSpec, state: Mapping[str, torch.Tensor], eval_spec: EvalSpec,
                     work_dir: Path, residual: Mapping[str, torch.Tensor] | None = None) -> EvalReport:
    """Merge ``state`` into the base (layer by layer), evaluate the merged model, and delete the merged weights.

    The EvalScope outputs (reports, reviews, predictions, logs) stay in ``work_dir/evalscope``.
    """
    from coordinator.release.merge import merge_adapter

    t0 = time.monotonic()
    work_dir = Path(work_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    merged = work_dir / "merged"
    try:
        merge_adapter(Path(base_model), spec, state, merged, residual=residual)
        results = run_evalscope(eval_spec, merged, work_dir / "evalscope")
    finally:
        shutil.rmtree(merged, ignore_errors=True)
    return EvalReport(results, time.monotonic() - t0, work_dir)


def warm_up() -> None:
    """Import EvalScope and its model stack ahead of the first evaluation (a few seconds on 2 cores)."""
    try:
        _import_evalscope()
        import evalscope.models  # noqa: F401
    except Exception as e:  # a missing extra is reported, with its fix, by the evaluation itself
        log.debug("[Evaluation.warm_up] %s", e)
