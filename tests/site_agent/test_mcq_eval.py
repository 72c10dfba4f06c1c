"""Site-private multiple-choice accuracy on held-out data: detection, the greedy letter choice, and only metrics
leaving in ``eval_global``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from coordinator.config import LoraSpec
from coordinator.rounds.adapter import init_adapter
from protos.fedbridge.v1 import federation_service_pb2 as pb
from site_agent.agent import _report_eval
from site_agent.training.data import load_sft
from site_agent.training.evaluation import is_mcq, mcq_accuracy, mcq_choices, mcq_options
from site_agent.training.trainer import SftSiteTrainer

QUESTIONS = ["What is the capital of Zorvia?", "Which river feeds Lake Quor?", "Who founded Velmar?",
             "What colour is the Xan flag?"]


def _mcq_row(question: str, answer: str) -> dict[str, Any]:
    prompt = f"{question}\nA. Ormund\nB. Pell\nC. Trask\nD. Ivo\nAnswer with the letter."
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def _mcq_file(tmp_path: Path, answers: list[str]) -> list[dict[str, Any]]:
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(_mcq_row(q, a)) + "\n" for q, a in zip(QUESTIONS, answers, strict=True)))
    return load_sft(path)


def _greedy_letter(trainer: SftSiteTrainer, question: str) -> str:
    """The oracle: the option letter with the highest next-token logit after the prompt's generation header."""
    prompt = trainer.tokenizer.apply_chat_template(_mcq_row(question, "A")["messages"][:1], tokenize=True,
                                                   add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = trainer.model(input_ids=torch.tensor([list(prompt)])).logits[0, -1]
    ids = [trainer.tokenizer.encode(x, add_special_tokens=False)[0] for x in "ABCD"]
    return "ABCD"[int(torch.argmax(logits[ids]))]


@pytest.fixture(scope="module")
def trainer(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SftSiteTrainer:
    return SftSiteTrainer(tiny_model_dir, [], tmp_path_factory.mktemp("work"))


def test_only_letter_answers_to_listed_options_are_multiple_choice() -> None:
    # Prepare
    plain = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}
    unlisted = _mcq_row("Q?", "A")
    unlisted["messages"][0]["content"] = "Q?\nA. yes\nB. no"
    unlisted["messages"][1]["content"] = "C"

    # Execute / Assert
    assert mcq_options(_mcq_row("Q?", " B ")) == ("A", "B", "C", "D")
    assert mcq_options(plain) is None and mcq_options(unlisted) is None
    assert is_mcq([_mcq_row("Q?", "A")]) and not is_mcq([_mcq_row("Q?", "A"), plain]) and not is_mcq([])


def test_accuracy_is_one_against_the_models_own_choices_and_zero_against_others(trainer: SftSiteTrainer,
                                                                                 tmp_path: Path) -> None:
    # Prepare: the model's own greedy letters, then gold answers that agree with them, and ones that never do
    init = init_adapter(trainer.base_model, LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    trainer.load_adapter(init.spec, init.state)
    own = mcq_choices(trainer.model, trainer.tokenizer, _mcq_file(tmp_path, ["A"] * 4))
    other = ["B" if c == "A" else "A" for c in own]
    half = [own[0], own[1], other[2], other[3]]

    # Execute
    accs = [mcq_accuracy(trainer.model, trainer.tokenizer, _mcq_file(tmp_path, g)) for g in (own, other, half)]

    # Assert: the choices are the greedy letter, worked out independently from the prompt's next-token logits ...
    assert own == [_greedy_letter(trainer, q) for q in QUESTIONS]
    # ... and accuracy is the fraction of rows whose greedy letter is the answer, by hand: 4/4, 0/4, 2/4
    assert accs == [1.0, 0.0, 0.5]
    assert trainer.model.training  # scoring leaves the model as it found it


class _Client:
    def __init__(self) -> None:
        self.reports: list[tuple[int, str, dict[str, float], int]] = []

    def report_metrics(self, round: int, phase: str, metrics: dict[str, float], n: int) -> None:
        self.reports.append((round, phase, metrics, n))


def test_eval_global_reports_accuracy_only_for_multiple_choice_data(trainer: SftSiteTrainer, tmp_path: Path) -> None:
    # Prepare
    init = init_adapter(trainer.base_model, LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    task = pb.Task(round=2, adapter_spec=init.spec)
    mcq = _mcq_file(tmp_path, ["A", "B", "C", "D"])
    plain = [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."}]}]
    client = _Client()

    # Execute
    _report_eval(client, trainer, task, init.state, mcq)
    _report_eval(client, trainer, task, init.state, plain)

    # Assert: only numbers leave, and accuracy only for the MCQ file
    (r1, p1, m1, n1), (_, _, m2, _) = client.reports
    assert (r1, p1, n1) == (2, "eval_global", 4)
    assert set(m1) == {"loss", "tokens", "accuracy"} and 0.0 <= m1["accuracy"] <= 1.0
    assert m1["accuracy"] == mcq_accuracy(trainer.model, trainer.tokenizer, mcq)
    assert set(m2) == {"loss", "tokens"}
    assert all(isinstance(v, float) for m in (m1, m2) for v in m.values())
