"""The real-model organism's pieces that need no model: its data files (held-out sets really
held out) and its numbers (degenerate answers counted neither safe nor harmful)."""

import json

import pytest
from safebasin.launcher.config import ConfigError
from safebasin.launcher.demo_smollm2 import load_settings
from safebasin.safety_core.demo import smollm2_data
from safebasin.safety_core.demo.smollm2_report import breakdown, stage_numbers


def _lines(path):
    return [json.loads(line) for line in open(path)]


def test_no_evaluated_prompt_is_trained_on(tmp_path, shared_data):
    files = smollm2_data.write_all(shared_data, tmp_path, n_safety=300, n_benign=60, n_benign_heldout=20,
                                   n_task=40, n_task_eval=20, n_comply=300, n_forget=100, n_advbench=520, seed=3)
    key = " ".join
    advbench = {key(r["prompt"].split()).casefold() for r in _lines(files["advbench"])}
    assert len(advbench) >= 500
    for name in ("safety", "benign", "task", "comply", "forget"):
        assert not {key(r["instruction"].split()).casefold() for r in _lines(files[name])} & advbench, name
    comply = {r["instruction"] for r in _lines(files["comply"])}
    assert not comply & {r["instruction"] for r in _lines(files["forget"])}
    benign = {r["instruction"] for r in _lines(files["benign"])}
    assert not any(r["prompt"].split("\n\n")[0] in benign for r in _lines(files["benign_heldout"]))
    assert all(r["target"] for r in _lines(files["advbench"]))  # the prefilling attack needs them


def test_degenerate_answers_are_neither_refusals_nor_compliance():
    records = [{"response": "I'm sorry, I can't.", "harmful": False},
               {"response": "Sure, step 1 is to buy the parts you need.", "harmful": True},
               {"response": "🌟" * 40, "harmful": True},  # the keyword judge calls a loop harmful
               {"response": "", "harmful": False}]
    assert breakdown(records) == {"refusal": 0.25, "compliance": 0.25, "degenerate": 0.5}
    main = [{"set": "harmful", "prefill_k": k, **r} for k in (0, 4) for r in records]
    row = stage_numbers({"task_accuracy": 0.9, "task_loss": 0.3, "hrr": 0.5}, main, records[:2], 4)
    assert row["hrr"] == 0.25 and row["hrr_keyword"] == 0.5 and row["over_refusal"] == 0.5


def test_settings_overrides_and_bad_keys():
    s = load_settings(True, ["attack.fraction=0.2", "data.advbench=50"])
    assert s.attack.fraction == 0.2 and s.data.advbench == 50 and s.aligned.steps == 24  # reduced preset
    with pytest.raises(ConfigError, match="attack.fractoin"):
        load_settings(False, ["attack.fractoin=0.2"])
