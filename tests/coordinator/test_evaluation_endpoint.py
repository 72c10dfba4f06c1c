"""``[evaluation] mode = "endpoint"``: EvalScope's service mode (``openai_api``) scores a real OpenAI-compatible HTTP
server on loopback that the coordinator starts on the merged model, and gets the same scores as ``mode = "local"``."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from coord_helpers import LORA, config, train_on_qa

from coordinator.config import EvalSpec
from coordinator.release.evaluation import EvaluationError, evaluate_adapter, task_config
from coordinator.rounds.adapter import init_adapter
from sandbox.benchmarks import make_shared_benchmark


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _endpoint(port: int, **over: object) -> dict[str, object]:
    return {"mode": "endpoint", "api_url": f"http://127.0.0.1:{port}/v1", "model_id": "fed-merged",
            "api_key_env": "FEDBRIDGE_TEST_EVAL_KEY", "ready_timeout_s": 120.0,
            "serve_command": [sys.executable, "-m", "sandbox.openai_server", "{model_dir}", "--port", str(port),
                              "--model-id", "fed-merged", "--api-key-env", "FEDBRIDGE_TEST_EVAL_KEY"], **over}


def test_endpoint_mode_scores_the_served_merged_model_like_local_mode(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDBRIDGE_TEST_EVAL_KEY", "k-" + "x" * 12)
    bench = make_shared_benchmark(tmp_path / "bench", n_sites=1, per_family=3)
    init = init_adapter(tiny_model_dir, LORA)
    trained = train_on_qa(tiny_model_dir, init, bench.qa_dir, steps=25)
    common = {"enabled": True, "benchmarks": bench.benchmark_tables(), "max_new_tokens": 8}
    local = config(tmp_path / "l", tiny_model_dir, evaluation=common).evaluation
    port = _free_port()
    endpoint = config(tmp_path / "e", tiny_model_dir, evaluation={**common, **_endpoint(port)}).evaluation
    got = {}
    for name, spec in (("local", local), ("endpoint", endpoint)):
        report = evaluate_adapter(base_model=tiny_model_dir, spec=init.spec, state=trained, eval_spec=spec,
                                  work_dir=tmp_path / name)
        got[name] = {b: (r.score, r.metrics, r.subsets) for b, r in report.results.items()}
    assert set(got["local"]) == {"general_mcq", "general_qa"}
    assert got["endpoint"] == got["local"]
    assert got["local"]["general_qa"][0] > 0.3  # the trained adapter answers: a score that could differ
    # The server was stopped after scoring: nothing listens on its port any more.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_endpoint_task_config_and_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDBRIDGE_TEST_EVAL_KEY", "secret-value")
    spec = EvalSpec(**_endpoint(9))  # type: ignore[arg-type]
    cfg = task_config(spec, tmp_path / "merged", tmp_path / "w")
    assert (cfg["eval_type"], cfg["api_url"], cfg["model"], cfg["api_key"]) == (
        "openai_api", "http://127.0.0.1:9/v1", "fed-merged", "secret-value")
    assert "model_args" not in cfg
    monkeypatch.delenv("FEDBRIDGE_TEST_EVAL_KEY")
    with pytest.raises(EvaluationError, match="FEDBRIDGE_TEST_EVAL_KEY.*not set"):
        task_config(spec, tmp_path / "merged", tmp_path / "w")
    with pytest.raises(ValueError, match="'evaluation.serve_command'"):
        EvalSpec(**_endpoint(9, serve_command=["vllm", "serve"]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'evaluation.model_id'"):
        EvalSpec(**_endpoint(9, model_id=""))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'evaluation.api_key_env'"):
        EvalSpec(**_endpoint(9, api_key_env="sk-abc.def"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'evaluation.mode'"):
        EvalSpec(mode="remote")


def test_a_server_that_dies_is_reported(tiny_model_dir: Path, tmp_path: Path) -> None:
    from coordinator.release.evaluation import served

    spec = EvalSpec(**_endpoint(_free_port(), api_key_env="",  # type: ignore[arg-type]
                                serve_command=[sys.executable, "-c", "raise SystemExit(3)", "{model_dir}"]))
    (tmp_path / "merged").mkdir()
    with pytest.raises(EvaluationError, match="exited with code 3"), served(spec, tmp_path / "merged"):
        pass
