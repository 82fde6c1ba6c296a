"""Never lose a result: inputs never written, finished folders never replaced silently, resumes
that keep their plan, every bad input named in one line before the ranks start, signals that
end a job with 130/143, options and overrides in any order (issues 15 and 16.8).

Most cases fail before any DeepSpeed job starts and run `safebasin` in this process; two real
tiny jobs cover finished folders, resume plans and --overwrite, and two cover the signals.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import safebasin_cli
from safebasin.launcher.cli import build_parser, main, parse_args

QUICK_TRAIN = {"max_steps": 2, "lr": 1e-3, "micro_batch_size": 2, "gradient_accumulation_steps": 1}


def write_config(path: Path, *, model: dict | None = None, method: dict | None = None,
                 train: dict | None = None, out: Path | None = None, **sections) -> Path:
    cfg = {"model": model or {"path": "builtin:tiny-llama"},
           "method": method or {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
           "data": {"train": {"path": "builtin:task"}, "num_examples": 16, "max_length": 64},
           "train": {**QUICK_TRAIN, **(train or {})},
           "deepspeed": {"stage": 0},
           "tracking": {"experiment": "reliability"},
           "output": {"dir": str(out or path.parent / "out")}, **sections}
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`safebasin ARGS` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_refusal(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "{'model'" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A real PEFT LoRA adapter of the tiny model (random B, so it is not a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def basis_dir(tmp_path_factory, aligned_pair) -> Path:
    from safebasin.safety_core.anchor.basis import extract_basis
    base, aligned = aligned_pair
    out = tmp_path_factory.mktemp("basis") / "basis"
    extract_basis(str(aligned), str(base), out, modules=["q_proj", "v_proj", "gate_proj"], rank=2, device="cpu")
    return out


# ---------------------------------------------------------------------------------------------
# 1. No command writes where one of its inputs is, whichever way the paths relate


def _relations(root: Path, inp: Path) -> dict[str, str]:
    """output.dir values that relate to the input at `inp` in each way."""
    (root / "link").symlink_to(inp.parent, target_is_directory=True)
    return {"holds": str(inp.parent), "equal": str(inp), "inside": str(inp / "sub"),
            "symlink": str(root / "link" / inp.name), "dotdot": str(inp / ".." / inp.name)}


@pytest.mark.parametrize("relation", ["holds", "equal", "inside", "symlink", "dotdot"])
def test_train_full_never_writes_over_its_model(tmp_path, tiny_model_dir, mlflow_uri, capsys, relation):
    model = tmp_path / "X" / "model"
    shutil.copytree(tiny_model_dir, model)
    before = digest(model)
    out = _relations(tmp_path, model)[relation]
    cfg = write_config(tmp_path / "cfg.yaml", model={"path": str(model)}, method={"type": "full"})
    code, _, err = cli(capsys, "train", cfg, f"output.dir={out}", "train.save_every=0")
    assert_one_line_refusal(code, err, f"output.dir {out}", f"model.path {model}")
    assert digest(model) == before


def test_train_lora_never_writes_over_its_adapter_or_data(tmp_path, tiny_model_dir, adapter_dir, mlflow_uri, capsys):
    adapter = tmp_path / "Y" / "adapter"
    shutil.copytree(adapter_dir, adapter)
    data = tmp_path / "Y" / "train.jsonl"
    data.write_text(json.dumps({"prompt": "2+2?", "response": "4"}) + "\n")
    before = digest(tmp_path / "Y")
    cfg = write_config(tmp_path / "cfg.yaml", model={"path": "builtin:tiny-llama", "adapter": str(adapter)})
    code, _, err = cli(capsys, "train", cfg, f"output.dir={tmp_path / 'Y'}", f"data.train.path={data}")
    assert_one_line_refusal(code, err, f"output.dir {tmp_path / 'Y'} holds the input model.adapter {adapter}",
                            f"holds the input data.train.path {data}")
    assert digest(tmp_path / "Y") == before


def test_restore_never_writes_over_its_adapter(tmp_path, tiny_model_dir, adapter_dir, mlflow_uri, capsys):
    adapter = tmp_path / "Y" / "adapter"
    shutil.copytree(adapter_dir, adapter)
    before = digest(adapter)
    cfg = tmp_path / "restore.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"path": "builtin:tiny-llama", "adapter": str(adapter)},
        "restore": {"forget": {"path": "builtin:harmful"}, "retain": {"path": "builtin:task"}, "forget_size": 8,
                    "curvature_forget_size": 8, "retain1_size": 8, "retain2_size": 8, "iterations": 1, "probes": 5},
        "output": {"dir": str(tmp_path / "Y")}}))
    code, _, err = cli(capsys, "restore", cfg)
    assert_one_line_refusal(code, err, f"output.dir {tmp_path / 'Y'} holds the input model.adapter {adapter}")
    assert digest(adapter) == before


def test_align_basis_never_writes_into_its_models(tmp_path, aligned_pair, capsys):
    base, aligned = (shutil.copytree(p, tmp_path / p.name) for p in aligned_pair)
    before = digest(tmp_path)
    code, _, err = cli(capsys, "align-basis", "--aligned", aligned, "--base", base, "--out", aligned, "--device", "cpu")
    assert_one_line_refusal(code, err, f"--out {aligned} is the input --aligned {aligned}")
    code, _, err = cli(capsys, "align-basis", "--aligned", aligned, "--base", base, "--out", tmp_path, "--device", "cpu")
    assert_one_line_refusal(code, err, f"--out {tmp_path} holds the input --base {base}")
    assert digest(tmp_path) == before


def test_safe_lora_project_never_writes_into_its_adapter_or_basis(tmp_path, adapter_dir, basis_dir, capsys):
    adapter = shutil.copytree(adapter_dir, tmp_path / "adapter")
    before = digest(adapter)
    code, _, err = cli(capsys, "safe-lora-project", "--adapter", adapter, "--basis", basis_dir, "--out", adapter / "projected")
    assert_one_line_refusal(code, err, f"--out {adapter / 'projected'} lies inside the input --adapter {adapter}")
    code, _, err = cli(capsys, "safe-lora-project", "--adapter", adapter, "--basis", basis_dir, "--out", basis_dir.parent)
    assert_one_line_refusal(code, err, f"holds the input --basis {basis_dir}")
    assert digest(adapter) == before


def test_demo_never_moves_or_replaces_what_it_must_keep(tmp_path, monkeypatch, capsys):
    import mlflow
    from safebasin.launcher.demo import MARKER
    out = tmp_path / "demo"
    out.mkdir()
    (out / MARKER).write_text("{}")
    (out / "results.json").write_text('{"stages": {}}')
    store = out / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    mlflow.MlflowClient(f"sqlite:///{store}").search_experiments()  # a real store, inside --out
    before = digest(out)
    code, _, err = cli(capsys, "demo", "--quick", "--out", out, "--overwrite")
    assert_one_line_refusal(code, err, f"--out {out} holds the input the MLflow store {store}")
    store.unlink()
    code, _, err = cli(capsys, "demo", "--quick", "--out", out)  # a previous demo: never replaced silently
    assert_one_line_refusal(code, err, f"--out {out} holds a previous demo's results", "--overwrite")
    assert (out / "results.json").read_text() == '{"stages": {}}' and MARKER in os.listdir(out)
    assert set(before) - {"mlflow.db"} == set(digest(out))


# ---------------------------------------------------------------------------------------------
# 2, 3. Finished folders are never replaced silently; a resume keeps the plan


def loss_steps(uri: str, run_id: str) -> list[int]:
    import mlflow
    return [m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, "loss")]


def test_finished_folder_refuses_rerun_and_resume_keeps_the_plan(tmp_path, tiny_model_dir, mlflow_uri, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", out=out, train={"save_every": 1})
    res = safebasin_cli("train", str(cfg), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    first_run = results["mlflow_run_id"]
    before = digest(out)

    # A plain re-run: refused, naming both ways forward; nothing touched.
    code, _, err = cli(capsys, "train", cfg)
    assert_one_line_refusal(code, err, f"output.dir {out} holds a previous job's results", "--resume", "--overwrite")
    # The same without checkpoints (a job saved with train.save_every=0).
    no_ckpt = tmp_path / "no-ckpt"
    shutil.copytree(out, no_ckpt, ignore=shutil.ignore_patterns("checkpoints"))
    code, _, err = cli(capsys, "train", cfg, f"output.dir={no_ckpt}")
    assert_one_line_refusal(code, err, f"output.dir {no_ckpt} holds a previous job's results", "--overwrite")

    # A resume that changes the plan: refused, naming the key and both values.
    code, _, err = cli(capsys, "train", cfg, "--resume", "train.max_steps=4")
    assert_one_line_refusal(code, err, "train.max_steps: 2 when the job started, 4 now")
    code, _, err = cli(capsys, "train", cfg, "train.lr=0.5", "--resume")
    assert_one_line_refusal(code, err, "train.lr: 0.001 when the job started, 0.5 now")
    code, _, err = cli(capsys, "train", cfg, "--resume", "train.micro_batch_size=4")
    assert_one_line_refusal(code, err, "global batch", "2 x 1 x 1 = 2 when the job started, 4 x 1 x 1 = 4 now")

    # Resuming the finished run: said so, the real final loss printed, every output as it was.
    code, stdout, err = cli(capsys, "train", cfg, "--resume")
    assert code == 0, err
    assert "holds a finished run" in stdout and "nothing to resume" in stdout
    assert f"final loss {results['metrics']['loss']:.4f}" in stdout and "nan" not in stdout
    assert digest(out) == before

    # --overwrite: the old result moves aside intact, the new job gets a new MLflow run.
    res = safebasin_cli("train", str(cfg), "--overwrite", cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    moved, = tmp_path.glob("run.replaced-*")
    assert digest(moved) == before and f"moved aside to {moved}" in res.stdout
    second_run = json.loads((out / "results.json").read_text())["mlflow_run_id"]
    assert second_run != first_run
    assert loss_steps(mlflow_uri, first_run) == [1, 2] and loss_steps(mlflow_uri, second_run) == [1, 2]


# ---------------------------------------------------------------------------------------------
# 4. Every input checked on the launching process, one line each, before any rank starts


@pytest.mark.parametrize("override, needle", [
    ("model.path=/nonexistent/model", "model.path /nonexistent/model: no such folder"),
    ("model.path=./nonexistent", "model.path ./nonexistent: no such folder"),
    ("model.adapter=/nonexistent/adapter", "model.adapter /nonexistent/adapter: no such folder"),
    ("data.train.path=missing.jsonl", "data.train.path missing.jsonl: no such file"),
    ("data.train.path=builtin:nope", "data.train.path: unknown built-in data set 'builtin:nope'"),
    ("method.target_modules=[q_proj,v_projj]", "method.target_modules: 'v_projj' matches no module"),
])
def test_bad_inputs_are_named_in_one_line_before_ranks(tmp_path, tiny_model_dir, mlflow_uri, capsys, override, needle):
    cfg = write_config(tmp_path / "cfg.yaml")
    t0 = time.monotonic()
    code, _, err = cli(capsys, "train", cfg, override, "--nproc", "2")
    assert_one_line_refusal(code, err, needle)
    assert len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - t0 < 30 and not (tmp_path / "out").exists()


def test_model_folder_without_weights_and_adapter_folder_without_adapter(tmp_path, tiny_model_dir, mlflow_uri, capsys):
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(tiny_model_dir / "config.json", model)
    cfg = write_config(tmp_path / "cfg.yaml", model={"path": str(model), "adapter": str(tiny_model_dir)})
    code, _, err = cli(capsys, "train", cfg)
    assert_one_line_refusal(code, err, f"model.path {model}: config.json but no weights",
                            f"model.adapter {tiny_model_dir}: no adapter_config.json")


def test_offline_hub_id_and_dataset_name_not_cached(tmp_path, tiny_model_dir, mlflow_uri, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = write_config(tmp_path / "cfg.yaml")
    code, _, err = cli(capsys, "train", cfg, "model.path=someorg/not-cached")
    assert_one_line_refusal(code, err, "model.path someorg/not-cached: no such folder, and not in the Hugging Face cache")
    code, _, err = cli(capsys, "train", cfg, "data.train.path=someorg/not-cached-data")
    assert_one_line_refusal(code, err, "data.train.path someorg/not-cached-data: no such file, and not a data set "
                            "in the Hugging Face cache")


def test_basis_that_does_not_match_the_model(tmp_path, tiny_model_dir, basis_dir, mlflow_uri, capsys):
    # The basis comes from a model whose MLP has 175 rows; the built-in tiny Llama has 176.
    cfg = write_config(tmp_path / "cfg.yaml", method={"type": "full"}, anchor={"basis": str(basis_dir), "lambda": 1.0})
    code, _, err = cli(capsys, "train", cfg)
    assert_one_line_refusal(code, err, f"anchor.basis {basis_dir}:", "do not match the model's shapes", "[175, 64]")
    cfg = write_config(tmp_path / "cfg.yaml", anchor={"basis": str(tmp_path / "no-basis"), "lambda": 1.0})
    code, _, err = cli(capsys, "train", cfg)
    assert_one_line_refusal(code, err, "anchor.basis:", "manifest.json")


def test_output_folder_that_cannot_be_written(tmp_path, tiny_model_dir, mlflow_uri, capsys):
    cfg = write_config(tmp_path / "cfg.yaml")
    (tmp_path / "a-file").write_text("x")
    code, _, err = cli(capsys, "train", cfg, f"output.dir={tmp_path / 'a-file'}")
    assert_one_line_refusal(code, err, f"output.dir {tmp_path / 'a-file'} exists and is not a folder")
    code, _, err = cli(capsys, "train", cfg, f"output.dir={tmp_path / 'a-file' / 'out'}")
    assert_one_line_refusal(code, err, f"its parent {tmp_path / 'a-file'} is a file")
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        code, _, err = cli(capsys, "train", cfg, f"output.dir={ro / 'out'}")
        assert_one_line_refusal(code, err, f"cannot write in {ro}")


def test_judge_input_errors(tmp_path, capsys):
    array = tmp_path / "records.json"
    array.write_text(json.dumps([{"prompt": "p", "response": "r"}]))
    code, _, err = cli(capsys, "judge", "--judge", "keyword", "--input", array, "--json", tmp_path / "o.json")
    assert_one_line_refusal(code, err, "a JSON array, but --input takes JSONL")
    code, _, err = cli(capsys, "judge", "--judge", "keyword", "--input", tmp_path / "none.jsonl", "--json", tmp_path / "o.json")
    assert_one_line_refusal(code, err, "none.jsonl: no such file")
    lines = tmp_path / "r.jsonl"
    lines.write_text(json.dumps({"prompt": "p", "answer": "r"}) + "\n")
    code, _, err = cli(capsys, "judge", "--judge", "keyword", "--input", lines, "--json", lines)
    assert_one_line_refusal(code, err, f"--json {lines} is the input --input {lines}")
    code, _, err = cli(capsys, "judge", "--judge", "keyword", "--input", lines, "--json", tmp_path / "o.json")
    assert_one_line_refusal(code, err, "r.jsonl:1: no string 'response' field")


def test_missing_response_field_is_named():
    from safebasin.safety_core.train.data import DataError, DataSource, to_conversation
    with pytest.raises(DataError) as e:
        to_conversation("f.jsonl:3", {"prompt": "hi", "reply": "x"}, DataSource(path="f.jsonl"))
    assert "None" not in str(e.value) and "'reply'" in str(e.value) and "fields: {response: COLUMN}" in str(e.value)


# ---------------------------------------------------------------------------------------------
# SIGINT / SIGTERM end a job with 130 / 143, nothing half-written kept as a result


def _start(tmp_path: Path, *extra: str) -> subprocess.Popen:
    cfg = write_config(tmp_path / "cfg.yaml", train={"max_steps": 100000, "save_every": 0})
    return subprocess.Popen([sys.executable, "-m", "safebasin.launcher.cli", "train", str(cfg), *extra],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _stop_after_first_step(proc: subprocess.Popen, metrics: Path, send) -> tuple[int, str]:
    try:
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.5)
        send()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, err


def test_sigterm_ends_an_in_process_job_with_143(tmp_path, tiny_model_dir, mlflow_uri):
    proc = _start(tmp_path)
    code, err = _stop_after_first_step(proc, tmp_path / "out" / "metrics.jsonl",
                                       lambda: os.kill(proc.pid, signal.SIGTERM))
    assert code == 143, err[-3000:]
    assert "stopped by SIGTERM (exit 143)" in err
    assert not (tmp_path / "out" / "results.json").exists()
    import mlflow
    run_id = json.loads((tmp_path / "out" / "mlflow_run.json").read_text())["run_id"]
    assert mlflow.MlflowClient(mlflow_uri).get_run(run_id).info.status == "FAILED"


@pytest.mark.multiproc
def test_ctrl_c_ends_a_launched_job_with_130(tmp_path, tiny_model_dir, mlflow_uri):
    # --rank-logs sends even one rank through the launcher; Ctrl-C signals the whole group.
    proc = _start(tmp_path, "--rank-logs", str(tmp_path / "logs"))
    code, err = _stop_after_first_step(proc, tmp_path / "out" / "metrics.jsonl",
                                       lambda: os.killpg(proc.pid, signal.SIGINT))
    assert code == 130, err[-3000:]
    assert not (tmp_path / "out" / "results.json").exists()


# ---------------------------------------------------------------------------------------------
# Issue 16.8: options and dotted overrides in any order


@pytest.mark.parametrize("command", ["train", "restore", "eval"])
def test_options_and_overrides_in_any_order(command):
    parser = build_parser()
    for argv in ([command, "c.yaml", "--nproc", "2", "deepspeed.stage=3", "output.dir=x"],
                 [command, "c.yaml", "deepspeed.stage=3", "--nproc", "2", "output.dir=x"],
                 [command, "--nproc", "2", "c.yaml", "deepspeed.stage=3", "output.dir=x"]):
        args = parse_args(parser, argv)
        assert (args.config, args.nproc, args.overrides) == ("c.yaml", 2, ["deepspeed.stage=3", "output.dir=x"])
    with pytest.raises(SystemExit):
        parse_args(parser, [command, "c.yaml", "--nproc", "2", "a=1", "--no-such-option"])


def test_overrides_after_options_reach_the_config(tmp_path, tiny_model_dir, mlflow_uri, capsys):
    cfg = write_config(tmp_path / "cfg.yaml")
    code, _, err = cli(capsys, "train", cfg, "--nproc", "2", "deepspeed.stage=3", "model.path=/after/options")
    assert_one_line_refusal(code, err, "model.path /after/options: no such folder")
