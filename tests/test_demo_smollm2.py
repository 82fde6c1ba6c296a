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


def test_recovery_and_development_sets_are_held_apart(tmp_path, shared_data):
    counts = dict(n_safety=100, n_benign=60, n_benign_heldout=20, n_task=40, n_task_eval=20, n_comply=200,
                  n_forget=64, n_advbench=520, seed=3)
    plain = smollm2_data.write_all(shared_data, tmp_path / "plain", **counts)
    deep = smollm2_data.write_all(shared_data, tmp_path / "deep", **counts, n_deep=150, n_dev_harmful=80,
                                  n_dev_benign=30)
    for name in ("comply", "forget", "benign", "benign_heldout", "task"):  # a seed keeps its other data
        assert _lines(plain[name]) == _lines(deep[name]), name
    safety = _lines(deep["safety"])
    recovery = [r for r in safety if "response_prefix" in r]
    assert len(safety) == 250 and len(recovery) == 150
    assert all(r["response"] in smollm2_data.RECOVERY_REFUSALS and r["response_prefix"] for r in recovery)
    used = {r["instruction"] for name in ("comply", "forget") for r in _lines(deep[name])}
    dev = {r["prompt"] for r in _lines(deep["dev_harmful"])}
    assert len(dev) == 80 and all(r["target"] for r in _lines(deep["dev_harmful"]))
    assert not dev & used and not dev & {r["instruction"] for r in recovery}
    assert not {r["instruction"] for r in recovery} & used
    advbench = {" ".join(r["prompt"].split()).casefold() for r in _lines(deep["advbench"])}
    assert not {" ".join(p.split()).casefold() for p in dev} & advbench
    held = {r["prompt"] for r in _lines(deep["benign_heldout"])}
    assert len(_lines(deep["dev_benign"])) == 30 and not held & {r["prompt"] for r in _lines(deep["dev_benign"])}


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


def _stage_row(hrr, acc):
    return {"hrr": hrr, "prefill_asr": 1.0, "task_accuracy": acc, "task_loss": 0.5, "over_refusal": 0.1,
            "refusal": 1 - hrr, "compliance": hrr, "degenerate": 0.0, "hrr_keyword": hrr}


def _finished_seed(folder, settings, seed, lora_hrr):
    """A seed folder as a finished one-seed run leaves it (marker, results.json)."""
    from safebasin.launcher.demo import MARKER
    from safebasin.safety_core.demo.smollm2 import STAGES
    folder.mkdir(parents=True)
    (folder / MARKER).write_text(json.dumps({"safebasin_demo": 1, "organism": "smollm2",
                                             "settings": settings.model_copy(update={"seed": seed}).model_dump(by_alias=True)}))
    stages = {name: _stage_row(lora_hrr if name == "lora" else 0.05, 0.8) for name in STAGES}
    (folder / "results.json").write_text(json.dumps({
        "per_seed": {str(seed): stages}, "stage_seconds": {str(seed): {"aligned": 100.0, "lora": 50.0}},
        "mlflow": {"stage_run_ids": {}}}))
    return folder


def test_combine_joins_seeds_run_apart_and_refuses_other_settings(tmp_path, monkeypatch):
    from safebasin.launcher.demo_smollm2 import combine
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    settings = load_settings(False, [])
    a = _finished_seed(tmp_path / "a", settings, 0, 0.4)
    b = _finished_seed(tmp_path / "b", settings, 1, 0.6)
    def out(name):
        def prepare():
            (tmp_path / name).mkdir()
            return tmp_path / name
        return prepare
    result = combine(settings, [a, b], out("all"))
    assert result["seeds"] == [0, 1]
    assert result["stages"]["lora"]["hrr"] == pytest.approx(0.5)
    assert result["aggregate"]["lora"]["hrr"]["sd"] == pytest.approx(0.1414, abs=1e-3)
    assert result["checks"]["asft keeps safety"]["ok"]  # 0.05 <= 0.5 / 2
    assert "l2" in result["anchor_verdict"] and (tmp_path / "all" / "results.json").is_file()
    from mlflow.tracking import MlflowClient
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result["mlflow"]["parent_run_id"])
    assert run.data.metrics["lora.hrr"] == pytest.approx(0.5)
    other = _finished_seed(tmp_path / "c", load_settings(False, ["attack.steps=10"]), 2, 0.5)
    with pytest.raises(ConfigError, match="differ in attack"):
        combine(settings, [a, other], out("x"))
    with pytest.raises(ConfigError, match="seed 0 is in more than one folder"):
        combine(settings, [a, a], out("y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused: nothing made


def test_resume_keeps_finished_stages(tmp_path, monkeypatch):
    """A seed whose stages are all recorded runs no job on --resume (no model is even loaded)
    and reports the recorded numbers."""
    from safebasin.launcher.demo_smollm2 import run
    from safebasin.safety_core.anchor.basis import MANIFEST
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    settings = load_settings(False, ["threads=1"])
    seed = _finished_seed(tmp_path / "s", settings, 0, 0.4)
    (seed / "data").mkdir()
    (seed / "data" / "advbench.jsonl").write_text("")
    (seed / "base").mkdir()
    (seed / "base" / "model").mkdir()
    (seed / "basis").mkdir()
    (seed / "basis" / MANIFEST).write_text("{}")
    result = run(settings, [0], seed, resume=True, log=lambda *a: None)
    assert result["stages"]["lora"]["hrr"] == pytest.approx(0.4)
    assert json.loads((seed / "results.json").read_text())["per_seed"]["0"]["lora"]["hrr"] == pytest.approx(0.4)


def test_combine_never_writes_into_a_folder_it_reads(tmp_path):
    from conftest import safebasin_cli
    settings = load_settings(False, [])
    a = _finished_seed(tmp_path / "a", settings, 0, 0.4)
    before = (a / "results.json").read_text()
    res = safebasin_cli("demo", "--organism", "smollm2", "--combine", str(a), "--out", str(a), "--overwrite",
                        cwd=tmp_path)
    assert res.returncode != 0 and "--combine folder" in res.stderr
    assert (a / "results.json").read_text() == before


def test_resume_keeps_the_seed_layout(tmp_path):
    """A resume with other seeds than the folder was started with is refused, naming both; a
    several-seed folder records its seeds, so a one-seed result never replaces its results."""
    from safebasin.launcher.demo import MARKER
    from safebasin.launcher.demo_smollm2 import _resumed_seeds
    settings = load_settings(False, [])
    one = _finished_seed(tmp_path / "one", settings, 0, 0.4)
    assert _resumed_seeds(one, None) == [0]
    with pytest.raises(ConfigError, match="started with --seeds 0; --seeds 1"):
        _resumed_seeds(one, [1])
    several = tmp_path / "several"
    several.mkdir()
    (several / MARKER).write_text(json.dumps({"organism": "smollm2", "seeds": [0, 1, 2],
                                              "settings": settings.model_dump(by_alias=True)}))
    assert _resumed_seeds(several, None) == [0, 1, 2]
    with pytest.raises(ConfigError, match="started with --seeds 0,1,2"):
        _resumed_seeds(several, [0])


def test_a_stage_some_seeds_lack_is_aggregated_over_those_that_have_it():
    from safebasin.safety_core.study.report import aggregate
    agg = aggregate([{"lora": _stage_row(0.9, 0.8), "restored_benign": _stage_row(0.2, 0.8)},
                     {"lora": _stage_row(0.7, 0.8)}])
    assert agg["lora"]["hrr"]["mean"] == pytest.approx(0.8) and len(agg["lora"]["hrr"]["values"]) == 2
    assert agg["restored_benign"]["hrr"] == {"mean": 0.2, "sd": 0.0, "values": [0.2]}
