"""`safebasin study`: the study file format (refusals before any job), the tiny organism as a study
(what the demo prints), sweeps, a user's study file run on a tiny model, resume,
combine and the answer cache.

(Over 300 lines: one file for the study command, as there is one per command; the refusals, the
organisms' study files and the runner's resume, cache, combine and sweeps are its parts.)"""

import json
from pathlib import Path

import pytest
from conftest import REPO, safebasin_cli
from safebasin.launcher.config import build
from safebasin.launcher.study import LauncherJobs
from safebasin.safety_core.study import plan as plan_mod
from safebasin.safety_core.study import runner, spec
from safebasin.safety_core.study.spec import StudyError

TINY = REPO / "examples" / "studies" / "tiny.yaml"
LLAMA = REPO / "examples" / "studies" / "llama3.1-8b-instruct.yaml"
SMOLLM2 = REPO / "examples" / "studies" / "smollm2.yaml"


def _plan(raw: dict):
    return plan_mod.check(spec.validate(raw))


def _small(stages: dict, **extra) -> dict:
    """A study with model stages only (nothing to train), for the refusal tests."""
    return {"name": "t", "models": {"m": "builtin:tiny-llama"}, "stages": stages, **extra}


def test_unknown_keys_are_named_with_the_allowed_ones():
    with pytest.raises(StudyError) as err:
        _plan(_small({"a": {"command": "model", "config": {"path": "x"}}}, stagez={}))
    assert any("stagez: unknown key" in p and "'stages'" in p and "did you mean 'stages'" in p
               for p in err.value.problems), err.value.problems
    with pytest.raises(StudyError) as err:
        _plan(_small({"a": {"comand": "model"}}))
    assert any(p.startswith("stages.a.comand: unknown key") and "'command'" in p for p in err.value.problems)
    with pytest.raises(StudyError, match="stages.a.command.*'train'"):
        _plan(_small({"a": {"command": "trian"}}))
    # A key unknown to the stage's own job config is named by the job config's schema.
    study, _ = spec.read(TINY, ["stages.lora.config.method.rr=4"], "quick")
    with pytest.raises(StudyError) as err:
        runner.prepare(plan_mod.check(study), [0], Path("/nonexistent/out"), LauncherJobs(1))
    assert any(p.startswith("stages.lora.config: method.rr: unknown key") and "'r'" in p for p in err.value.problems)


def test_a_reference_no_earlier_stage_makes_is_refused_naming_stage_and_reference():
    with pytest.raises(StudyError) as err:
        _plan(_small({"a": {"command": "model", "config": {"path": "${models.m}"}},
                      "b": {"command": "restore", "config": {"model": {"path": "${stages.nope.model}"}}}}))
    assert any("stage b: ${stages.nope.model} reads stage 'nope', which no stage is" in p for p in err.value.problems)
    with pytest.raises(StudyError) as err:  # an output the stage does not make: a full model has no adapter
        _plan(_small({"a": {"command": "train", "config": {"method": {"type": "full"}}},
                      "b": {"command": "restore", "config": {"model": {"adapter": "${stages.a.adapter}"}}}}))
    assert any("stage b: ${stages.a.adapter}: stage a (train) makes no 'adapter'; it makes: model, dir" in p
               for p in err.value.problems)
    with pytest.raises(StudyError, match=r"stage a: \$\{data.task\}: no data entry"):
        _plan(_small({"a": {"command": "model", "config": {"path": "${data.task}"}}}))
    with pytest.raises(StudyError, match="checks.c: lora_hrr.*no stage named|checks.c: hrr\\(b\\): no stage"):
        _plan(_small({"a": {"command": "model", "config": {"path": "x"}}}, checks={"c": "hrr(b) >= 0"}))


def test_a_cycle_is_refused_and_named():
    stages = {"a": {"command": "restore", "config": {"model": {"path": "${stages.c.model}"}}},
              "b": {"command": "restore", "config": {"model": {"path": "${stages.a.model}"}}},
              "c": {"command": "restore", "config": {"model": {"path": "${stages.b.model}"}}}}
    with pytest.raises(StudyError) as err:
        _plan(_small(stages))
    assert any("cycle: a -> c -> b -> a" in p for p in err.value.problems), err.value.problems
    # Order follows the references, not the file: a stage may be written before what it reads.
    stages = {"b": {"command": "restore", "config": {"model": {"path": "${stages.a.model}"}}},
              "a": {"command": "model", "config": {"path": "x"}}}
    assert _plan(_small(stages)).order == ["a", "b"]


def test_refused_study_starts_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    raw = json.loads(json.dumps(__import__("yaml").safe_load(TINY.read_text())))
    raw["stages"]["restored"]["config"]["model"]["adapter"] = "${stages.aligned.adapter}"
    bad.write_text(__import__("yaml").safe_dump(raw))
    res = safebasin_cli("study", str(bad), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert res.returncode == 2
    assert "stage restored: ${stages.aligned.adapter}: stage aligned (train) makes no 'adapter'" in res.stderr
    assert not (tmp_path / "out").exists()


def test_expressions_cannot_run_code():
    from safebasin.safety_core.study import expr
    for text in ("__import__('os')", "vars.__class__", "(lambda: 1)()", "[x for x in y]"):
        with pytest.raises(expr.ExprError):
            expr.evaluate(expr.parse(text), {"vars": {}})
    assert expr.substitute("${max(1, vars.s // 20)}", {"vars": {"s": 35}}) == 1
    assert expr.substitute("run-${seed + 1}", {"seed": 2}) == "run-3"
    with pytest.raises(expr.ExprError, match="Python keyword"):
        expr.parse("vars.anchor.lambda")


@pytest.mark.parametrize("preset", [None, "reduced"])
def test_smollm2_study_resolves_the_organisms_settings(preset, tmp_path, shared_data):
    """The SmolLM2 study's jobs carry the organism's chosen settings (docs/results.md): restoration
    at the dev-chosen eps 0.025, alignment of every linear module, the attack's lr and steps, the
    reduced preset's fewer steps and prompts; the dev suites measure the aligned model only."""
    study, _ = spec.read(SMOLLM2, [f"vars.data.dir={shared_data}"], preset)
    r = runner.prepare(plan_mod.check(study), [0], tmp_path, LauncherJobs(1))[0]
    reduced = preset == "reduced"
    assert {name: r.stages[name]["restore"]["eps"] for name in ("restored", "restored_first_order",
                                                                 "restored_benign")} == dict.fromkeys(
        ("restored", "restored_first_order", "restored_benign"), 0.025)
    assert r.stages["restored_first_order"]["restore"]["curvature_sources"] == "none"
    assert r.stages["restored"]["restore"]["iterations"] == (1 if reduced else 3)
    assert r.stages["aligned"]["method"] == {"type": "full", "trainable": [
        "q_proj.", "k_proj.", "v_proj.", "o_proj.", "gate_proj.", "up_proj.", "down_proj."]}
    assert r.stages["aligned"]["train"]["max_steps"] == (24 if reduced else 160)
    assert r.stages["aligned"]["data"]["harmful_mix"]["fraction"] == 0.7  # the dev-chosen safety share
    for name in ("lora", "asft", "l2", "lora_benign"):
        train = r.stages[name]["train"]
        assert (train["lr"], train["max_steps"], train["warmup_steps"]) == ((1e-3, 12, 1) if reduced else (1e-3, 40, 4))
        assert r.stages[name]["method"]["target_modules"] == ["q_proj", "v_proj"] and r.stages[name]["data"]["seed"] == 1
    assert r.stages["asft"]["anchor"] == {"basis": str(r.root / "basis"), "lambda": 10.0}
    assert r.stages["l2"]["anchor"]["variant"] == "l2" and r.stages["basis"]["rank"] == 8
    assert r.data["builders"]["organism"][1]["advbench"] == (24 if reduced else 100)
    assert study.evals["dev"].stages == study.evals["dev_benign"].stages == ["aligned"]
    assert r.suites["main"]["eval"]["prefill_k"] == [8] and r.suites["main"]["eval"]["max_new_tokens"] == (
        24 if reduced else 32)


def test_smollm2_frontier_sweeps_put_every_arm_on_one_basis(tmp_path, shared_data):
    """The anchoring frontier (off by default): 5 arms x 5 lambdas (6 in the reference regime),
    every arm on the same basis stage, the reference regime at 10% harmful / lr 1e-4 / 80 steps
    with the reference's LoRA and optimizer (the study stage of examples/asft_reference_lora.yaml's
    settings), its plain attack a point of its own with the same settings and no anchor, measured
    by the reduced suite (50 AdvBench prompts, 100 SST-2)."""
    on = ["sweeps.frontier.enabled=true", "sweeps.frontier_reference.enabled=true", "sweeps.attack_reference.enabled=true"]
    study, _ = spec.read(SMOLLM2, [f"vars.data.dir={shared_data}", *on], None)
    plan = plan_mod.check(study)
    assert len(plan.points) == 56
    r = runner.prepare(plan, [0], tmp_path, LauncherJobs(1))[0]
    arms = {"safelora", "l2", "aligned", "random-subspace", "projector"}
    assert {r.stages[f"frontier-{a}-100"]["anchor"]["variant"] for a in arms} == arms
    assert {r.stages[f"frontier_reference-{a}-1"]["anchor"]["basis"] for a in arms} == {str(r.root / "basis")}
    strong, ref = r.stages["frontier-l2-0.1"], r.stages["frontier_reference-l2-1e+06"]
    plain = r.stages["attack_reference-0"]
    assert "anchor" not in plain and {k: plain[k] for k in ("method", "data", "train")} == {
        k: ref[k] for k in ("method", "data", "train")}
    assert strong["data"] == r.stages["lora"]["data"] and strong["train"] == r.stages["lora"]["train"]
    assert ref["data"]["harmful_mix"]["fraction"] == 0.1 and ref["data"]["train"] == strong["data"]["train"]
    assert (ref["train"]["lr"], ref["train"]["max_steps"], ref["train"]["warmup_steps"]) == (1e-4, 80, 0)
    assert (ref["train"]["schedule"], ref["train"]["step_gamma"], ref["train"]["weight_decay"]) == ("step", 0.85, 0.0)
    assert ref["method"] == {**strong["method"], "r": 8, "alpha": 32.0, "dropout": 0.05}  # the reference's LoRA
    assert r.suites["frontier"]["eval"]["harmful"]["limit"] == 50 and r.suites["frontier"]["eval"]["task"]["limit"] == 100
    assert not plan_mod.check(spec.read(SMOLLM2, [f"vars.data.dir={shared_data}"], None)[0]).points


def test_stages_runs_the_named_stages_and_what_they_read():
    """--stages: the plan cut to the named stages and the stages they read, in order; a check
    over a stage that did not run is not evaluated (ok None), and it fails no run."""
    from safebasin.safety_core.study import report
    plan = plan_mod.check(spec.read(SMOLLM2)[0])
    cut = plan_mod.select(plan, ["safe_lora", "restored"])
    assert cut.order == ["base", "aligned", "basis", "lora", "safe_lora", "restored"]
    assert cut.evaluated == ["base", "aligned", "lora", "safe_lora", "restored"] and "asft" not in cut.suites
    with pytest.raises(StudyError, match="--stages: no stage named 'safe-lora'; stages: base, aligned"):
        plan_mod.select(plan, ["safe-lora"])
    with pytest.raises(StudyError, match="sweep 'frontier' is not enabled; add sweeps.frontier.enabled=true"):
        plan_mod.select(plan, ["frontier"])
    # A sweep's name runs its points and what they read (the basis and the aligned model), not the
    # attack stage they sweep nor the other sweep's points.
    swept = plan_mod.check(spec.read(SMOLLM2, ["sweeps.frontier.enabled=true",
                                               "sweeps.frontier_reference.enabled=true"], None)[0])
    cut = plan_mod.select(swept, ["frontier"])
    assert cut.order[:3] == ["base", "aligned", "basis"] and len(cut.order) == 28 == 3 + len(cut.points)
    assert {p.sweep for p in cut.points.values()} == {"frontier"} and "lora" not in cut.order
    assert cut.suites["frontier-l2-0.1"] == ["frontier"] and cut.evaluated == list(cut.points)
    one = plan_mod.select(swept, ["frontier-l2-1", "frontier-safelora-1"])  # points named alone
    assert list(one.points) == one.evaluated == ["frontier-safelora-1", "frontier-l2-1"]
    both = plan_mod.select(swept, ["frontier", "aligned"])  # the stages the points read, measured when named
    assert both.order == cut.order and both.evaluated == ["base", "aligned", *cut.points]
    row = {"hrr": 0.6, "prefill_asr": 0.4, "over_refusal": 0.1, "task_accuracy": 0.8, "degenerate": 0.0}
    found = report.checks(plan.study, {"aligned": dict(row, hrr=0.02), "lora": row})
    assert found["attack erodes safety"]["ok"] is True and found["asft keeps safety"]["ok"] is None
    assert report.all_hold(found) and "[-] asft keeps safety" in report.check_lines(found)
    found = report.checks(plan.study, {"aligned": dict(row, hrr=0.5), "lora": row})
    assert not report.all_hold(found)


def test_tiny_study_prints_the_demos_report(tmp_path, mlflow_uri):
    """`safebasin study tiny.yaml --preset quick` (what `safebasin demo --quick` runs): the table
    with its caption, every check, the anchor verdict, both landscapes, and one MLflow parent run
    with a nested run per stage. (The numbers of `safebasin demo` before it ran this file, commit
    65ce6a5, were compared with this study's at seed 0, quick and full: docs/demo.md.)"""
    study = safebasin_cli("study", str(TINY), "--preset", "quick", "--out", str(tmp_path / "study"),
                          cwd=tmp_path, timeout=400)
    assert study.returncode == 0, study.stderr[-3000:]
    ours = json.loads((tmp_path / "study" / "results.json").read_text())
    plan = plan_mod.check(spec.read(TINY, [], "quick")[0])
    assert set(ours["per_seed"]["0"]) == set(plan.evaluated) and not plan.points  # the sweep is off by default
    assert list(ours["checks"]) == list(plan.study.checks)
    assert "LoRA + restoration" in study.stdout and "[x] base complies" in study.stdout
    assert "On 6 held-out harmful prompts" in study.stdout and "prefilling forces K=2" in study.stdout
    assert ours["verdicts"]["anchor"].startswith("AsFT") and ours["verdicts"]["anchor"] in study.stdout
    assert Path(ours["seed_plots"]["0"]["hrr_during_training.png"]).is_file()
    scapes = ours["landscapes"]["0"]
    assert sorted(scapes) == ["landscape_alignment", "landscape_attack"]
    for name, scape in scapes.items():
        assert scape["alphas"] == ([-1.0, 0.0] if name == "landscape_alignment" else [0.0, 1.0])
        assert len(scape["hrr"]) == 2 and Path(scape["png"]).is_file()
    from mlflow.tracking import MlflowClient
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(ours["mlflow"]["experiment"])
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{ours['mlflow']['parent_run_id']}'")
    assert sorted(r.info.run_name for r in children) == sorted(f"{n} seed 0" for n in plan.order)


def _llama_overrides(base: Path, aligned: Path) -> list[str]:
    """The user's Llama study on the built-in tiny model and built-in data, every size minimal."""
    return [f"models.instruct={aligned}", f"models.base={base}", "defaults.model.dtype=float32",
            "defaults.deepspeed.stage=0", "evals.main.model.dtype=float32", "evals.benign.model.dtype=float32",
            'data.pools.dolly.source={path: "builtin:task"}', "data.pools.dolly.splits={task: 48, task_eval: 8}",
            'data.pools.harmful.source={path: "builtin:harmful"}', "data.pools.harmful.splits={comply: 24, forget: 16}",
            'data.pools.advbench.source={path: "builtin:harmful-heldout"}', "data.pools.advbench.splits={advbench: 6}",
            'data.pools.alpaca.source={path: "builtin:task-eval"}', "data.pools.alpaca.splits={benign_heldout: 4}",
            "vars.attack={fraction: 0.3, examples: 16, steps: 2, lr: 1.0e-3, batch: 4, accumulation: 1, r: 4, "
            "alpha: 8.0, max_length: 64}",
            "vars.restore={forget_size: 8, curvature_forget_size: 8, retain_size: 8, iterations: 1, batch_size: 4}",
            "vars.eval={max_new_tokens: 6, prefill_k: 2, batch_size: 8}", "stages.basis.config.device=cpu"]


class _Runs:
    """The MLflow parent run's interface, recording instead of logging (the nesting is the CLI
    test's); the stages' own jobs log to MLFLOW_TRACKING_URI."""
    run_id = "parent"

    def __init__(self):
        import os
        self.uri, self.adopted = os.environ["MLFLOW_TRACKING_URI"], {}

    def adopt(self, key, run_id, metrics):
        self.adopted[key] = metrics

    def stage_run(self, name):
        return f"run {name}"

    def record(self, *args):
        pass

    def end(self, status):
        pass


def test_users_llama_study_runs_on_the_tiny_model_and_resumes(tmp_path, aligned_pair, monkeypatch):
    import shutil
    base, aligned = aligned_pair[0], tmp_path / "instruct"
    shutil.copytree(aligned_pair[1], aligned)  # the perturbed tiny model, given its base's tokenizer
    for f in Path(base).iterdir():
        if not (aligned / f.name).exists():
            shutil.copy(f, aligned / f.name)
    study, raw = spec.read(LLAMA)
    assert study.models["instruct"] == "meta-llama/Llama-3.1-8B-Instruct" and study.defaults["deepspeed"]["stage"] == 3
    plan_mod.check(study)  # the file as shipped is valid
    study, raw = spec.read(LLAMA, _llama_overrides(base, aligned))
    plan = plan_mod.check(study)
    jobs, out = LauncherJobs(1), tmp_path / "out"
    monkeypatch.setenv("SAFEBASIN_TRACKING_WRITER", "thread")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = _Runs()
    resolved = runner.prepare(plan, [0], out, jobs)
    out.mkdir()
    result = runner.run(plan, resolved, out, jobs, runs, log=lambda *a: None)
    rows = result["per_seed"][0]
    assert set(rows) == {"instruct", "lora", "asft", "l2", "restored"}
    for row in rows.values():
        assert set(row) == {"hrr", "refusal", "degenerate", "prefill_asr", "prefill_degenerate", "task_loss",
                            "over_refusal"}
        assert row["hrr"] + row["refusal"] + row["degenerate"] == pytest.approx(1.0)
    assert set(result["checks"]) == set(study.checks)
    # Disjoint splits of one pool.
    data = out / "seed0" / "data"
    comply, forget = ({line for line in (data / f"{n}.jsonl").read_text().splitlines()} for n in ("comply", "forget"))
    assert len(comply) == 24 and len(forget) == 16 and not comply & forget
    # Ten evaluations (five stages, two suites), each a folder of its own.
    assert len(list((out / "evals").iterdir())) == 10

    # Resume: every stage finished, so nothing runs again and the numbers are the recorded ones.
    before = {p: p.stat().st_mtime for p in (out / "seed0").glob("*/results.json")}
    again = runner.run(plan, resolved, out, _Explode(jobs), _Runs(), log=lambda *a: None)
    assert again["per_seed"][0] == rows
    assert {p: p.stat().st_mtime for p in (out / "seed0").glob("*/results.json")} == before
    # An unfinished stage (no record of it finishing) runs again from the start, its folder moved
    # aside; the stages after it are kept, and it alone is evaluated again.
    progress = json.loads((out / "seed0" / "progress.json").read_text())
    del progress["stages"]["restored"]
    (out / "seed0" / "progress.json").write_text(json.dumps(progress))
    counting = _Counting(jobs)
    third = runner.run(plan, resolved, out, counting, _Runs(), log=lambda *a: None)
    assert counting.commands == ["restore", "eval", "eval"]
    assert list((out / "seed0").glob("restored.replaced-*"))
    assert third["per_seed"][0]["lora"] == rows["lora"]
    # A finished stage whose config changed is refused rather than silently kept.
    changed, _ = spec.read(LLAMA, _llama_overrides(base, aligned) + ["vars.attack.lr=0.5"])
    changed_plan = plan_mod.check(changed)
    with pytest.raises(StudyError, match="stage lora .* finished with another config"):
        runner.run(changed_plan, runner.prepare(changed_plan, [0], out, jobs), out, jobs, _Runs(),
                   log=lambda *a: None)


class _Explode:
    def __init__(self, jobs):
        self.jobs = jobs

    def problems(self, command, config):
        return self.jobs.problems(command, config)

    def run(self, command, config):
        raise AssertionError(f"a finished study ran {command} on resume")

    def aside(self, folder):
        raise AssertionError(f"a finished study moved {folder} on resume")


class _Counting(_Explode):
    def __init__(self, jobs):
        super().__init__(jobs)
        self.commands = []

    def run(self, command, config):
        self.commands.append(command)
        return self.jobs.run(command, config)

    def aside(self, folder):
        return self.jobs.aside(folder)


def test_answers_are_never_generated_twice_for_the_same_model_and_prompts(tmp_path, monkeypatch):
    """Two suites asking the same model the same prompts with the same settings share one eval;
    a different generation setting is another evaluation."""
    study, raw = spec.read(TINY, [], "quick")
    raw = json.loads(json.dumps(raw))
    raw["evals"]["again"] = {**raw["evals"]["main"], "stages": ["base", "lora"],
                             "metrics": {"hrr_again": "hrr"}}
    raw["evals"]["longer"] = {**raw["evals"]["main"], "stages": ["base"], "metrics": {"hrr_longer": "hrr"},
                              "eval": {**raw["evals"]["main"]["eval"], "max_new_tokens": 7}}
    plan = plan_mod.check(spec.validate(raw))
    jobs = _Counting(LauncherJobs(1))
    monkeypatch.setenv("SAFEBASIN_TRACKING_WRITER", "thread")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = runner.run(plan, runner.prepare(plan, [0], tmp_path, jobs), tmp_path, jobs, _Runs(), log=lambda *a: None)
    assert jobs.commands.count("eval") == 7 + 1  # main's seven, once each; `longer` once; `again` none
    rows = result["per_seed"][0]
    assert rows["base"]["hrr_again"] == rows["base"]["hrr"] and rows["lora"]["hrr_again"] == rows["lora"]["hrr"]
    assert "hrr_longer" in rows["base"]


def test_combine_joins_seed_folders_and_refuses_another_study(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    study, raw = spec.read(TINY, ["sweeps.frontier.enabled=true", "sweeps.frontier.grid={variant: [safelora, l2], "
                                  "lam: [1.0]}"])
    plan = plan_mod.check(study)

    def folder(name, seed, lora_hrr, spec_raw=raw):
        f = tmp_path / name
        f.mkdir()
        runner.write_marker(f, spec_raw, [seed])
        row = {"hrr": 0.05, "refusal": 0.95, "degenerate": 0.0, "prefill_asr": 0.5, "prefill_degenerate": 0.0,
               "task_accuracy": 0.9, "task_loss": 0.3}
        stages = {n: dict(row) for n in plan.evaluated if n not in plan.points}
        stages["base"]["hrr"], stages["lora"]["hrr"] = 0.9, lora_hrr
        points = {n: dict(row, hrr=lora_hrr / 2) for n in plan.points}  # kept apart in results.json
        (f / "results.json").write_text(json.dumps({"per_seed": {str(seed): stages},
                                                    "per_seed_points": {str(seed): points},
                                                    "stage_seconds": {str(seed): {"lora": 5.0}},
                                                    "mlflow": {"stage_run_ids": {str(seed): {}}}}))
        return f
    a, b = folder("a", 0, 0.4), folder("b", 1, 0.6)

    def out(name):
        def make():
            (tmp_path / name).mkdir()
            return tmp_path / name
        return make
    from safebasin.launcher.demo import DemoRuns
    result = runner.combine(plan, raw, [a, b], out("all"),
                            lambda f: DemoRuns(f"sqlite:///{tmp_path / 'mlflow.db'}", "c", {}, "safebasin-study"))
    assert result["seeds"] == [0, 1] and result["stages"]["lora"]["hrr"] == pytest.approx(0.5)
    assert result["checks"]["attack erodes safety"]["ok"]  # 0.5 - 0.05 >= 0.2 on the means
    assert result["per_seed_checks"][0]["attack erodes safety"]["ok"] is True  # 0.4 - 0.05
    # The sweep's points join again: each point's mean over the two seeds, written as its CSV.
    frontier = result["sweeps"]["frontier"]
    assert [(r["stage"], r["hrr"]) for r in frontier["points"]] == [("frontier-safelora-1", pytest.approx(0.25)),
                                                                  ("frontier-l2-1", pytest.approx(0.25))]
    assert frontier["per_seed"][1][0]["hrr"] == pytest.approx(0.3) and Path(frontier["files"]["csv"]).is_file()
    assert not set(result["stages"]) & set(plan.points)
    other = dict(raw, vars={**raw["vars"], "attack": {**raw["vars"]["attack"], "fraction": 0.5}})
    c = folder("c", 2, 0.5, other)
    with pytest.raises(StudyError, match="another study"):
        runner.combine(plan, raw, [a, c], out("x"), None)
    # A folder resumed with this spec (its stages kept where their configs did not change) is
    # this study now; its marker keeps the digest it had.
    runner.resumed_marker(c, raw)
    marker = json.loads((c / runner.MARKER).read_text())
    assert marker["digest"] == runner.spec_digest(raw) and marker["earlier_digests"] == [runner.spec_digest(other)]
    assert marker["seeds"] == [2]
    assert runner.combine(plan, raw, [a, c], out("z"), lambda f: DemoRuns(f"sqlite:///{tmp_path / 'mlflow.db'}", "c",
                                                                         {}, "safebasin-study"))["seeds"] == [0, 2]
    with pytest.raises(StudyError, match="seed 0 is in more than one folder"):
        runner.combine(plan, raw, [a, a], out("y"), None)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_study_cli_is_registered_and_documented():
    assert "safebasin study" in (REPO / "README.md").read_text()
    text = (REPO / "docs" / "study.md").read_text()
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    plan = plan_mod.check(spec.validate(__import__("yaml").safe_load(example)))  # the documented example is valid
    assert plan.order[:3] == ["shipped", "lora", "restored"] and set(plan.order[3:]) == set(plan.points)
    assert list(plan.points) == ["lr-0.001", "lr-0.01"]
    from safebasin.launcher.cli import build_parser
    args = build_parser().parse_args(["study", str(TINY), "--preset", "quick", "--seeds", "0,1", "--plan"])
    assert args.func.__name__ == "cmd_study" and args.preset == "quick"


def test_a_sweep_expands_a_stage_over_its_grid_and_is_checked():
    """Each point of a sweep is a stage of its own, named SWEEP-VALUE-..., in grid order (the first
    key outermost), its config the stage's with the sweep's merged over it; a sweep naming a stage,
    suite or grid key that does not exist is refused, naming the key."""
    raw = __import__("yaml").safe_load(TINY.read_text())
    raw["sweeps"]["frontier"].update(enabled=True, grid={"variant": ["l2", "safelora"], "lam": [1.0, 0.5]})
    plan = _plan(raw)
    assert list(plan.points) == ["frontier-l2-1", "frontier-l2-0.5", "frontier-safelora-1", "frontier-safelora-0.5"]
    point = plan.stages["frontier-safelora-0.5"]
    assert point.config["anchor"]["variant"] == "${sweep.variant}" and point.config["method"] == \
        raw["stages"]["lora"]["config"]["method"]
    assert plan.deps["frontier-l2-1"] == ["aligned", "basis"] and plan.suites["frontier-l2-1"] == ["main"]
    assert plan.order.index("frontier-l2-1") > plan.order.index("basis")
    bad = json.loads(json.dumps(raw))
    bad["sweeps"]["frontier"].update(stage="lroa", evals=["mian"])
    bad["sweeps"]["frontier"]["config"]["anchor"]["lambda"] = "${sweep.lamb}"
    with pytest.raises(StudyError) as err:
        _plan(bad)
    assert any(p.startswith("sweeps.frontier.stage: no stage named 'lroa'") for p in err.value.problems)
    assert any(p.startswith("sweeps.frontier.evals: no suite named 'mian'") for p in err.value.problems)
    assert any("${sweep.lamb}: the grid has no such key; grid keys: ['variant', 'lam']" in p for p in err.value.problems)
    with pytest.raises(StudyError, match="sweeps.frontier.grid: .*not identifiers"):
        _plan({**raw, "sweeps": {"frontier": {**raw["sweeps"]["frontier"], "grid": {"lambda-x": [1]}}}})
    # A sweep left off is checked all the same, and adds no stage.
    off = json.loads(json.dumps(bad))
    off["sweeps"]["frontier"]["enabled"] = False
    with pytest.raises(StudyError, match="no stage named 'lroa'"):
        _plan(off)
    assert not _plan({**raw, "sweeps": {"frontier": {**raw["sweeps"]["frontier"], "enabled": False}}}).points


def test_sweep_rows_means_csv_and_matched_pairs(tmp_path):
    """A sweep's result: one row per point (grid values under their column names), the means over
    seeds, the CSV and PNG, and the pairs at matched accuracy."""
    import csv
    from safebasin.safety_core.study import sweep
    raw = __import__("yaml").safe_load(TINY.read_text())
    raw["sweeps"]["frontier"].update(enabled=True, grid={"variant": ["safelora", "l2"], "lam": [1.0, 10.0]})
    plan = _plan(raw)
    sw = plan.study.sweeps["frontier"]
    row = {"hrr": 0.5, "refusal": 0.5, "degenerate": 0.0, "prefill_asr": 0.5, "prefill_degenerate": 0.0,
           "task_accuracy": 0.9, "task_loss": 0.3}
    seed0 = {n: dict(row) for n in plan.points}
    seed1 = {n: dict(row, hrr=0.1, task_accuracy=0.8 if "l2-10" in n else 0.9) for n in plan.points}
    rows = [sweep.rows(sw, plan.points, s) for s in (seed0, seed1)]
    assert rows[0][0] == {"variant": "safelora", "lambda": 1.0, "hrr": 0.5, "prefill_asr": 0.5, "task_accuracy": 0.9,
                          "task_loss": 0.3, "stage": "frontier-safelora-1"}
    table = sweep.mean_rows(sw, rows)
    assert [r["hrr"] for r in table] == pytest.approx([0.3] * 4)
    assert table[3]["task_accuracy"] == pytest.approx(0.85) and table[3]["lambda"] == 10.0
    files = sweep.write(sw, "frontier", table, tmp_path)
    with open(files["csv"]) as f:
        assert [(r["variant"], float(r["lambda"])) for r in csv.DictReader(f)] == \
            [("safelora", 1.0), ("safelora", 10.0), ("l2", 1.0), ("l2", 10.0)]
    assert Path(files["png"]).read_bytes()[:4] == b"\x89PNG"
    assert table[0]["hrr_sd"] == pytest.approx(0.2828, abs=1e-4) and table[0]["seeds"] == 2
    assert "task_accuracy_sd" in open(files["csv"]).readline()
    pairs = sweep.matched(sw, rows)  # l2 at lambda 10 is 0.05 off in accuracy: no pair with it
    assert {(p["lambda"], p["control_lambda"], p["seeds"]) for p in pairs} == {(1.0, 1.0, 2), (10.0, 1.0, 2)}
    # A method point is held against the control's best point at its accuracy, not any of them: a
    # strong lambda of the method beats a weak one of the control, not the control's frontier.
    flat_seed = [{"variant": v, "lambda": lam, "hrr": h, "task_accuracy": 0.8, "stage": f"frontier-{v}-{lam:g}"}
                 for v, lam, h in [("safelora", 1.0, 0.1), ("safelora", 10.0, 0.0), ("l2", 1.0, 0.1), ("l2", 10.0, 0.0)]]
    flat = sweep.mean_rows(sw, [flat_seed, flat_seed])
    assert [(p["lambda"], p["control_lambda"], p["hrr_gap"]) for p in sweep.matched(sw, [flat_seed, flat_seed])] == \
        [(1.0, 10.0, pytest.approx(0.1)), (10.0, 10.0, 0.0)]
    assert "no curve gives lower hrr" in sweep.verdict(sw, flat, sweep.matched(sw, [flat_seed, flat_seed]))
    # A pair measured on one seed (the method's points ran on seed 0 only) has no spread: never
    # "beyond" it, however large the gap.
    lone = [[dict(r, hrr=0.0 if r["variant"] == "safelora" else 0.5) for r in flat_seed],
            [dict(r, hrr=0.5) for r in flat_seed if r["variant"] == "l2"]]
    said = sweep.verdict(sw, sweep.mean_rows(sw, lone), sweep.matched(sw, lone))
    assert "one seed: no spread" in said and "no curve gives lower hrr" in said
    # Equal HRR means within a spread of 0.57: no verdict of "better"; a real gap beyond it is one.
    said = sweep.verdict(sw, table, pairs)
    assert ("safelora lambda 1 vs l2 1: hrr 0.300 vs 0.300 (gap +0.000, spread 0.566: within; 2 seed(s); "
            "best of 2 points)") in said
    assert said.endswith("Verdict: no curve gives lower hrr than l2 at the same task_accuracy beyond the seeds' spread.")
    seed1 = {n: dict(r, hrr=0.45) if n == "frontier-safelora-10" else r for n, r in seed1.items()}
    seed0 = {n: dict(r, hrr=0.05) if n == "frontier-safelora-10" else r for n, r in seed0.items()}
    rows = [sweep.rows(sw, plan.points, s) for s in (seed0, seed1)]
    table = sweep.mean_rows(sw, rows)
    pairs = sweep.matched(sw, rows)
    assert "give(s) lower hrr than l2" not in sweep.verdict(sw, table, pairs)  # 0.25 vs 0.30, sd 0.28
    seed1["frontier-safelora-10"]["hrr"] = 0.04
    seed1 = {n: dict(r, hrr=0.5) if "-l2-" in n else r for n, r in seed1.items()}  # the control: sd 0
    rows = [sweep.rows(sw, plan.points, s) for s in (seed0, seed1)]
    said = sweep.verdict(sw, sweep.mean_rows(sw, rows), sweep.matched(sw, rows))
    assert said.endswith("Verdict: safelora give(s) lower hrr than l2 at the same task_accuracy, beyond the seeds' spread.")


def test_matched_pairs_compare_points_on_the_seeds_they_share():
    """A third seed that ran only the control's points (its alignment lower on every point) must
    not make the method look worse: each pair is measured on the seeds that have both points."""
    from safebasin.safety_core.study import sweep
    raw = __import__("yaml").safe_load(TINY.read_text())
    raw["sweeps"]["frontier"].update(enabled=True, grid={"variant": ["safelora", "l2"], "lam": [1.0, 10.0]})
    plan = _plan(raw)
    sw = plan.study.sweeps["frontier"]
    row = {"hrr": 0.0, "prefill_asr": 0.5, "task_accuracy": 0.9}
    seeds = [{n: dict(row, hrr=h) for n in plan.points} for h in (0.4, 0.6)]
    seeds.append({n: dict(row, hrr=0.0) for n in plan.points if "-l2-" in n})
    rows = [sweep.rows(sw, plan.points, s) for s in seeds]
    table = sweep.mean_rows(sw, rows)
    means = {r["stage"]: r["hrr"] for r in table}
    assert means["frontier-safelora-1"] == pytest.approx(0.5) and means["frontier-l2-1"] == pytest.approx(1 / 3)
    pairs = sweep.matched(sw, rows)
    assert [(p["hrr"], p["control_hrr"], p["hrr_gap"], p["seeds"]) for p in pairs] == \
        [(pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.0), 2)] * 2
    said = sweep.verdict(sw, table, pairs)
    assert "hrr 0.500 vs 0.500 (gap +0.000, spread 0.283: within; 2 seed(s); best of 2 points)" in said
    # A method point and a control point that no seed ran together make no pair (and no error).
    apart = [[r for r in rows[0] if "-safelora-" in r["stage"]], [r for r in rows[1] if "-l2-" in r["stage"]]]
    assert sweep.matched(sw, apart) == []


def test_an_override_of_a_var_the_study_does_not_declare_is_refused():
    with pytest.raises(StudyError, match=r"override vars.attack.lrr: the study declares no var vars.attack.lrr; "
                                         r"vars.attack has: .*did you mean 'lr'\?"):
        spec.read(TINY, ["vars.attack.lrr=0.1"])
    with pytest.raises(StudyError, match="override vars.atack.lr: the study declares no var vars.atack; vars has"):
        spec.read(TINY, ["vars.atack.lr=0.1"])
    assert spec.read(TINY, ["vars.attack.lr=0.1"])[0].vars["attack"]["lr"] == 0.1


def test_an_answer_cache_key_ignores_how_the_job_runs():
    """Threads and tracking change how an evaluation runs, not its answers: a study resumed at
    another thread count reuses its answers (it generated them again before); a generation
    setting is another key."""
    from safebasin.safety_core.study import evalcache
    model = {"path": "/x/aligned/model"}
    job = {"eval": {"max_new_tokens": 32}, "runtime": {"threads": 2}, "tracking": {"enabled": False}}
    same = evalcache.key(model, {**job, "runtime": {"threads": 1}, "tracking": {"enabled": True}}, str)
    assert evalcache.key(model, job, str) == same
    assert evalcache.key(model, {**job, "eval": {"max_new_tokens": 24}}, str) != same
