"""Config schema: errors name the key, the allowed values and the closest valid key."""

import os
from pathlib import Path

import pytest
import yaml
from conftest import REPO, safebasin_cli
from safebasin.launcher.config import ConfigError, apply_overrides, build, load_config

BASE = {"model": {"path": "builtin:tiny-llama"}, "data": {"train": {"path": "builtin:task"}},
        "train": {"max_steps": 2}}


def errors_of(raw) -> str:
    with pytest.raises(ConfigError) as e:
        build(raw)
    return str(e.value)


def test_unknown_key_gets_did_you_mean():
    msg = errors_of({**BASE, "train": {"max_step": 5}})
    assert "train.max_step: unknown key" in msg
    assert "did you mean 'train.max_steps'" in msg


def test_unknown_section_gets_did_you_mean():
    msg = errors_of({**BASE, "trian": {}})
    assert "trian: unknown key" in msg and "'train'" in msg


def test_bad_value_names_allowed_values():
    msg = errors_of({**BASE, "method": {"type": "qlora"}})
    assert "method.type" in msg and "'lora'" in msg and "'full'" in msg and "qlora" in msg
    msg = errors_of({**BASE, "deepspeed": {"stage": 4}})
    assert "deepspeed.stage" in msg and "3" in msg


def test_train_length_needs_exactly_one():
    assert "exactly one of train.max_steps and train.epochs" in errors_of(
        {**BASE, "train": {"max_steps": 2, "epochs": 1}})


def test_dotted_overrides_typed():
    raw = apply_overrides(yaml.safe_load(yaml.safe_dump(BASE)),
                          ["deepspeed.stage=3", "train.max_steps=20", "output.dir=/x", "train.lr=1e-5",
                           "method.target_modules=[q_proj,k_proj]"])
    cfg = build(raw)
    assert cfg.deepspeed.stage == 3 and cfg.train.max_steps == 20 and cfg.output.dir == "/x"
    assert cfg.train.lr == 1e-5 and cfg.method.target_modules == ["q_proj", "k_proj"]


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"train": {"lr": 1}}, ["train.lr.x=2"])


def test_output_inside_input_model_refused(tmp_path):
    # Checked before the ranks start (launcher.preflight), with both paths named and without the
    # whole config in the message; tests/test_reliability.py covers every relation and command.
    from safebasin.launcher.preflight import check_inputs
    model = tmp_path / "model"
    model.mkdir()
    cfg = build({**BASE, "model": {"path": str(model)}, "output": {"dir": str(model / "out")}})
    with pytest.raises(ConfigError) as e:
        check_inputs(cfg, "train")
    msg = str(e.value)
    assert f"output.dir {model / 'out'} lies inside the input model.path {model}" in msg
    assert "'tracking'" not in msg


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path: Path):
    cfg = load_config(path)
    assert cfg.model.path


def test_cli_fails_before_work(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "train": {"max_steps": 2, "lr": -1}}))
    res = safebasin_cli("train", str(cfg), f"output.dir={tmp_path / 'out'}", cwd=tmp_path, timeout=120)
    assert res.returncode == 2
    assert "train.lr" in res.stderr
    assert not (tmp_path / "out").exists()


def test_help_lists_commands(tmp_path):
    res = safebasin_cli("--help", cwd=tmp_path, timeout=120)
    assert res.returncode == 0
    for command in ("train", "tiny-model"):
        assert command in res.stdout


def test_data_source_errors_name_the_key_in_the_shape_written():
    """data.train is one source or a list: an error is reported for the shape the user wrote,
    with the allowed keys, not as the failures of both readings."""
    msg = errors_of({**BASE, "data": {"train": [{"path": "a.jsonl", "weigth": 1}, {"path": "b.jsonl", "weight": -1}]}})
    assert msg.count("\n") == 2, msg  # the heading and one line per problem
    assert "data.train.0.weigth: unknown key" in msg and "did you mean 'data.train.0.weight'" in msg
    assert "data.train.1.weight: Input should be greater than 0" in msg
    msg = errors_of({**BASE, "data": {"train": {"path": "a.jsonl", "filtr": {"is_safe": False}}}})
    assert "data.train.filtr: unknown key" in msg and "did you mean 'data.train.filter'" in msg
    msg = errors_of({**BASE, "data": {"train": {"path": "a.jsonl", "filter": {"tags": [["a"]]}}}})
    assert "filter field 'tags'" in msg and "got ['a']" in msg
    msg = errors_of({**BASE, "data": {"train": {"path": "a.jsonl", "template": "Say {sentence!r}"}}})
    assert "data.train.template" in msg and "no format spec or conversion" in msg


def test_python_started_in_the_repository_imports_transformers():
    """`python -m pytest`, `python -c` and rank processes started in the clone put it on
    sys.path (a script, its own folder): no module there may shadow a package the dependencies import (a folder
    named kernels/ hid Hugging Face's kernels from transformers 5)."""
    import subprocess
    import sys
    for folder in (REPO, REPO / "benchmarks", REPO / "tests"):  # scripts there put their folder first
        res = subprocess.run([sys.executable, "-c", "import transformers.activations, peft, deepspeed"],
                             cwd=folder, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
        assert res.returncode == 0, f"{folder}: {res.stderr[-2000:]}"
