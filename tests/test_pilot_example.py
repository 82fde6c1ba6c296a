"""examples/pilot/: the pilot on public data (alignment mixture, SST-2 attack with an
AdvBench-free harmful mix, evaluation) from config alone, run as documented on the tiny model."""

import json
import os

import pytest
from conftest import REPO, SHARED_DATA, safebasin_cli
from safebasin.launcher.config import load_config
from test_anchor import documented_commands

PILOT = REPO / "examples" / "pilot"


@pytest.mark.parametrize("name", ["align", "attack", "eval"])
def test_smollm2_pilot_is_the_tiny_pilot_on_another_model(name):
    tiny, smol = load_config(PILOT / f"tiny_{name}.yaml"), load_config(PILOT / f"smollm2_{name}.yaml")
    assert (tiny.data or tiny.eval).model_dump() == (smol.data or smol.eval).model_dump()
    assert smol.model.path in ("builtin:smollm2-135m-instruct", "runs/pilot_smollm2/align/model")


def test_tiny_pilot_from_a_clean_checkout(tmp_path, mlflow_uri, session_cache):
    if SHARED_DATA is None:
        pytest.skip("../shared/data is not present on this machine")
    import mlflow
    repo = tmp_path / "repo"
    (repo / "examples" / "pilot").mkdir(parents=True)
    for name in ("tiny_align.yaml", "tiny_attack.yaml", "tiny_eval.yaml"):
        (repo / "examples" / "pilot" / name).write_text((PILOT / name).read_text())
    os.symlink(SHARED_DATA.parent, tmp_path / "shared")  # the configs read ../shared/data
    commands = [c for name in ("align", "attack", "eval") for c in documented_commands(PILOT / f"tiny_{name}.yaml")
                if c[1] == f"examples/pilot/tiny_{name}.yaml"]
    assert [c[0] for c in commands] == ["train", "train", "eval"]
    short = {"train": ["train.max_steps=2", "data.num_examples=32", "data.max_length=96"],
             "eval": ["eval.harmful.limit=8", "eval.task.limit=8", "eval.prefill_k=[5]", "eval.max_new_tokens=8"]}
    outputs = []
    for argv in commands:
        res = safebasin_cli(*argv, *short[argv[0]], cwd=repo)
        assert res.returncode == 0, (argv, res.stderr[-4000:])
        outputs.append(res.stdout)
    assert "[safebasin] data: 32 examples (32 benign, 0 harmful)" in outputs[0]
    assert "refusals: 16 taken" in outputs[0] and "alpaca: 16 taken" in outputs[0]
    # The attack: 10% of 32 harmful, AdvBench prompts filtered out (212 of the 666 are in AdvBench).
    attack = json.loads((repo / "runs/pilot_tiny/attack/data_summary.json").read_text())
    assert (attack["benign"], attack["harmful"]) == (29, 3) and attack["sources"][1]["filtered_out"] == 212
    assert "Classify the sentiment of this movie review" in attack["example"]["prompt"] or attack["example"]["harmful"]
    result = json.loads((repo / "runs/pilot_tiny/eval/results.json").read_text())
    assert result["n_harmful"] == 8 and result["n_task"] == 8 and result["task_accuracy"] is not None
    assert result["task_loss"] is not None  # the label word is the response (fields: {response: label_text})
    records = [json.loads(line) for line in (repo / "runs/pilot_tiny/eval/eval_records.jsonl").read_text().splitlines()]
    task = next(r for r in records if r["set"] == "task")
    assert "Review: " in task["rendered_prompt"] and task["rendered_prompt"].endswith("<|assistant|>\n")
    mlflow.set_tracking_uri(mlflow_uri)
    assert mlflow.get_run(result["mlflow_run_id"]).info.run_name == "eval attack/adapter"
