"""A federation on a real family's base (tiny Qwen2) with a federation-supplied chat template, as `fedbridge demo
--base-model DIR --chat-template FILE` lays it out: the template is pinned, travels with the task and is applied at
the sites; each site's FedAvg weight is the number of examples it holds."""

from __future__ import annotations

import json
import os
from pathlib import Path

from coordinator.rounds.store import Store
from fedcommon.auditlog import verify
from fedcommon.chat import template_sha256
from sandbox import localfed
from sandbox.families import QWEN2_TEMPLATE, build_family_model

# ChatML without Qwen's default system prompt: a template the federation supplies instead of the base's own.
SUPPLIED = QWEN2_TEMPLATE.replace("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "Be brief.")


def test_family_base_with_supplied_template_and_data_weights(tmp_path: Path) -> None:
    base = build_family_model("qwen2", cache_dir=os.environ.get("FEDBRIDGE_CACHE") or tmp_path / "cache")
    template = tmp_path / "chat.jinja"
    template.write_text(SUPPLIED)
    fed = localfed.prepare(tmp_path / "fed", base, n_sites=2, rounds=1, n_train=12, n_heldout=2,
                           training={"max_steps": 2, "batch_size": 2, "max_length": 64}, lora={"rank": 2},
                           chat_template=template, base_model_ref="tiny/qwen2")
    small = fed.sites[1]  # this site holds fewer examples than the other, and must weigh less
    rows = small.train_path.read_text().splitlines()
    small.train_path.write_text("\n".join(rows[:5]) + "\n")
    with fed:
        fed.start_coordinator()
        for s in fed.sites:
            fed.start_site(s)
        codes = fed.wait([s.name for s in fed.sites] + ["coordinator"], timeout=400)
        updates = Store(fed.state_dir).updates()
    assert set(codes.values()) == {0}, {n: localfed._tail(fed.log_path(n)) for n in codes}
    assert {u.site: u.num_examples for u in updates} == {fed.sites[0].name: 12, small.name: 5}
    for s in fed.sites:  # what the site signed and sent says the same, in its own audit log
        audit = fed.root / "sites" / s.name / "work" / "audit.jsonl"
        assert not verify(audit).problems
        events = [json.loads(line) for line in audit.read_text().splitlines()]
        sent = [e for e in events if e.get("event") == "update_sent"]
        assert sent and sent[0]["fields"]["num_examples"] == (5 if s is small else 12), sent
        accepted = [e for e in events if e.get("event") == "task_accepted"]
        assert accepted[0]["fields"]["chat_template_sha256"] == template_sha256(SUPPLIED)  # the pin reached the site
    assert template_sha256(SUPPLIED) != template_sha256(QWEN2_TEMPLATE)
