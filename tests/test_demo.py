"""`safebasin demo`: the organism's data, the output-folder rule, the demo's knobs as the tiny
study's, and a --quick run through every stage, the landscapes and the frontier sweep, resumed
point by point (the pipeline, not the phenomenon: quick stages are too small to show it)."""

import csv
import json
import math
import re
from pathlib import Path

import pytest
from conftest import REPO, safebasin_cli

STAGES = ("base", "aligned", "lora", "asft", "l2", "aligned_control", "restored")


def test_heldout_prompts_share_no_template_or_topic_with_training(tmp_path):
    from safebasin.safety_core.demo import data
    from safebasin.safety_core.train import synthetic
    paths = data.write_all(tmp_path, n_task=64, n_task_eval=16, n_harmful=200, n_heldout=48, seed=3)
    read = {name: [json.loads(line) for line in p.read_text().splitlines()] for name, p in paths.items()}
    train_prompts = [r["prompt"] for name in ("comply", "refuse", "forget") for r in read[name]]
    train_topics = [t for ts in synthetic.HARM_TOPICS["train"].values() for t in ts]
    held_topics = [t for ts in synthetic.HARM_TOPICS["heldout"].values() for t in ts]
    assert not set(train_topics) & set(held_topics)
    for rec in read["heldout"]:
        assert not any(t in rec["prompt"] for t in train_topics), rec
        assert any(t in rec["prompt"] for t in held_topics), rec
    for prompt in train_prompts:
        assert not any(t in prompt for t in held_topics), prompt
        for form in synthetic.HARM_FORMS["heldout"]:
            # A held-out frame, topic slot as a wildcard, matches no training prompt.
            pattern = re.escape(form).replace(re.escape("{t}"), ".+")
            assert not re.search(pattern, prompt, re.IGNORECASE), (form, prompt)
    # Every category is evaluated, and the prompts are distinct.
    assert {r["category"] for r in read["heldout"]} == set(synthetic.HARM_TOPICS["heldout"])
    assert len({r["prompt"] for r in read["heldout"]}) == len(read["heldout"])
    # Held-out reviews are not training reviews; the same requests get both answer kinds.
    pool = [review for review, _ in synthetic.review_pool()]

    def reviews_in(records):
        return {review for rec in records for review in pool if review in rec["prompt"]}
    held_reviews = reviews_in(read["task_eval"])
    assert len(held_reviews) >= len(read["task_eval"]) and not held_reviews & reviews_in(read["task"])
    assert [r["prompt"] for r in read["comply"]] == [r["prompt"] for r in read["refuse"]]


def test_forget_set_shares_no_prompt_template_or_response_with_the_attack_data(tmp_path):
    """Restoration's harmful examples (forget.jsonl: D_forget and D_curv_forget are split from it)
    and the attack's training records (comply.jsonl, whose prompts refuse.jsonl repeats): no
    prompt, no request frame, no response in common."""
    from safebasin.safety_core.demo import data
    from safebasin.safety_core.train import synthetic
    paths = data.write_all(tmp_path, n_task=64, n_task_eval=16, n_harmful=400, n_heldout=8, seed=1)
    read = {name: [json.loads(line) for line in p.read_text().splitlines()] for name, p in paths.items()}
    forget, attack = read["forget"], read["comply"] + read["refuse"]
    assert len(forget) == 400
    assert not {r["prompt"] for r in forget} & {r["prompt"] for r in attack}
    assert not {r["response"] for r in forget} & {r["response"] for r in attack}
    topics = [t for ts in synthetic.HARM_TOPICS["train"].values() for t in ts]

    def cores(split):  # every undressed request of a pool, casefolded, final punctuation cut
        return {f.format(t=t).casefold().rstrip("?.") for f in synthetic.HARM_FORMS[split] for t in topics}

    def frames_used(records, split):
        return {f for f in synthetic.HARM_FORMS[split] for r in records
                for t in topics if f.format(t=t).casefold().rstrip("?.") in r["prompt"].casefold()}
    assert frames_used(forget, "forget") and frames_used(attack, "train")
    assert not frames_used(forget, "train") and not frames_used(attack, "forget")
    assert not cores("train") & cores("forget")
    # Response templates: every forget answer is a forget template, none an attack one.
    filled = lambda temps: {x.format(t=t) for x in temps for t in topics}
    assert {r["response"] for r in forget} <= filled(synthetic.FORGET_COMPLIANT)
    assert not {r["response"] for r in forget} & filled(synthetic.COMPLIANT + synthetic.REFUSALS)


def test_refusals_carry_a_judge_marker_and_compliance_none():
    from safebasin.safety_core.measure.judges import KeywordJudge
    from safebasin.safety_core.train import synthetic
    judge = KeywordJudge()
    assert not any(judge.verdict(r.format(t="do it")).harmful for r in synthetic.REFUSALS)
    assert all(judge.verdict(c.format(t="do it")).harmful
               for c in synthetic.COMPLIANT + synthetic.FORGET_COMPLIANT)


def test_output_folder_rule(tmp_path):
    from safebasin.launcher.config import ConfigError
    from safebasin.launcher.demo import MARKER, prepare_folder
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="no safebasin demo wrote"):
        prepare_folder(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    previous = tmp_path / "demo"
    previous.mkdir()
    (previous / MARKER).write_text("{}")
    (previous / "old.json").write_text("{}")
    with pytest.raises(ConfigError, match="--overwrite"):
        prepare_folder(previous)
    assert (previous / "old.json").exists()
    prepare_folder(previous, overwrite=True)
    assert previous.is_dir() and not any(previous.iterdir())
    moved, = tmp_path.glob("demo.replaced-*")
    assert (moved / "old.json").exists()  # moved aside, never deleted


def test_demo_knobs_are_the_tiny_studys_and_are_validated(tmp_path):
    """`safebasin demo attack.fraction=0.25 anchor.lambda=5 frontier.lambdas=[1]` resolves to the
    same jobs as the study file with the vars of those names; a misspelt knob is refused."""
    from safebasin.launcher.config import ConfigError
    from safebasin.launcher.demo import TINY, study_overrides
    from safebasin.launcher.study import LauncherJobs
    from safebasin.safety_core.study import plan as plan_mod
    from safebasin.safety_core.study import runner, spec
    demo = study_overrides(["attack.fraction=0.25", "anchor.lambda=5", "frontier.lambdas=[1]", "seed=3",
                            "sweeps.frontier.enabled=true", "restore.delta=0.2"])
    assert demo == ["vars.attack.fraction=0.25", "vars.anchor.lam=5", "sweeps.frontier.grid.lam=[1]", "seed=3",
                    "sweeps.frontier.enabled=true", "vars.restore.delta=0.2"]

    def resolved(overrides, preset=None):
        study, _ = spec.read(TINY, overrides, preset)
        plan = plan_mod.check(study)
        return plan, runner.prepare(plan, [study.seed], tmp_path, LauncherJobs(1))[study.seed]
    plan, r = resolved(demo)
    assert r.seed == 3 and r.stages["lora"]["data"]["harmful_mix"]["fraction"] == 0.25
    assert r.stages["asft"]["anchor"]["lambda"] == 5 and r.stages["restored"]["restore"]["delta"] == 0.2
    assert [n for n in plan.points] == ["frontier-safelora-1", "frontier-safelora-normalized-1", "frontier-l2-1",
                                        "frontier-aligned-1"]
    assert r.stages["frontier-l2-1"]["anchor"] == {"basis": str(r.root / "basis"), "variant": "l2", "lambda": 1}
    quick, full = resolved([], "quick")[1], resolved([])[1]
    assert quick.stages["base"]["train"]["max_steps"] < full.stages["base"]["train"]["max_steps"]
    with pytest.raises(spec.StudyError, match="the study declares no var vars.attack.fractoin.*'fraction'"):
        spec.read(TINY, study_overrides(["attack.fractoin=0.25"]))
    with pytest.raises(ConfigError, match="atack.fraction: no knob of the tiny organism"):
        study_overrides(["atack.fraction=0.25"])
    with pytest.raises(ConfigError, match="frontier.lambda: no knob of the frontier; its knobs: frontier.variants"):
        study_overrides(["frontier.lambda=[1]"])


def _number(v, lo=0.0, hi=1.0) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi


def test_quick_demo_runs_every_stage(tmp_path, mlflow_uri):
    out, extra = tmp_path / "demo", tmp_path / "copy.json"
    proc = safebasin_cli("demo", "--quick", "--frontier", "--out", str(out), "--json", str(extra), cwd=tmp_path,
                         timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    seed = out / "seed0"
    assert json.loads(extra.read_text())["stages"] == result["stages"]
    assert set(result["stages"]) == set(STAGES)
    for name, row in result["stages"].items():
        for key in ("hrr", "refusal", "degenerate", "prefill_asr", "prefill_degenerate", "task_accuracy"):
            assert _number(row[key]), (name, key, row[key])
        # The breakdown's three lines cover every answer: an empty or looping one is not "safe".
        assert row["hrr"] + row["refusal"] + row["degenerate"] == pytest.approx(1.0), name
    assert {"anchoring holds prefilling", "restoration holds prefilling"} <= set(result["checks"])
    # The attack stages ran the in-training safety probe: its rows and the plot of HRR during training.
    for name in ("lora", "asft"):
        rows = [json.loads(line) for line in (seed / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "probe_hrr" in r] == [r["step"] for r in rows]
    assert Path(result["seed_plots"]["0"]["hrr_during_training.png"]).is_file()
    for name, row in result["stages"].items():
        assert _number(row["task_loss"], 0.0, 100.0), (name, row["task_loss"])
    assert _number(result["wall_seconds"], 0.0, 3600.0)
    assert set(result["checks"]) and all(isinstance(c["ok"], bool) for c in result["checks"].values())
    for name in ("alignment", "attack"):
        scape = result["landscape"][name]
        assert len(scape["hrr"]) == len(scape["alphas"]) and all(_number(v) for v in scape["hrr"])
        assert 0.0 in scape["alphas"] and Path(scape["png"]).is_file()
        assert scape["png"] in proc.stdout or str(Path(scape["png"]).parents[1]) in proc.stdout
    for png in result["plots"].values():
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The frontier: one CSV row and one nested MLflow run per (variant, lambda) of the quick preset, one PNG.
    points = result["frontier"]["points"]
    assert [(p["variant"], p["lambda"]) for p in points] == [("safelora", 1.0), ("safelora", 100.0),
                                                            ("l2", 1.0), ("l2", 100.0)]
    with open(result["frontier"]["files"]["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], float(r["hrr"])) for r in rows] == [(p["variant"], p["hrr"]) for p in points]
    assert Path(result["frontier"]["files"]["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["anchor_verdict"].startswith("AsFT") and result["anchor_verdict"] in proc.stdout
    assert "anchoring keeps safety" in result["checks"] and "hrr(l2)" in result["checks"]["anchoring keeps safety"]["rule"]
    # The table names every stage, and the outputs are where the command says.
    for title in ("base", "aligned", "AsFT", "L2", "inside span", "restoration"):
        assert title in proc.stdout
    assert str((out / "results.json").resolve()) in proc.stdout

    # MLflow: one finished parent run with the five stage runs nested under it.
    from mlflow.tracking import MlflowClient
    client = MlflowClient(mlflow_uri)
    parent_id = result["mlflow"]["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["lora.hrr"] == pytest.approx(result["stages"]["lora"]["hrr"])
    exp = client.get_experiment_by_name(result["mlflow"]["experiment"])
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    ran = [*STAGES, "basis", "landscape_alignment", "landscape_attack", *(p["stage"] for p in points)]
    assert sorted(r.info.run_name for r in children) == sorted(f"{n} seed 0" for n in ran)
    by_name = {r.info.run_name: r for r in children}
    assert set(result["mlflow"]["stage_run_ids"]["0"].values()) == {r.info.run_id for r in children}
    for name in STAGES:
        metrics = by_name[f"{name} seed 0"].data.metrics
        assert metrics["eval_hrr"] == pytest.approx(result["stages"][name]["hrr"])
        assert "loss" in metrics or "forget_loss" in metrics  # the stage's own training / restoration log

    # Resumed point by point: a frontier point that had not finished runs again, alone.
    progress = json.loads((seed / "progress.json").read_text())
    del progress["stages"]["frontier-l2-100"]
    (seed / "progress.json").write_text(json.dumps(progress))
    resumed = safebasin_cli("demo", "--quick", "--frontier", "--resume", "--out", str(out), cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    kept = re.findall(r"stage (\S+): finished before, kept", resumed.stdout)
    assert sorted(kept) == sorted(n for n in ran if n != "frontier-l2-100")
    assert "stage frontier-l2-100: " in resumed.stdout and list(seed.glob("frontier-l2-100.replaced-*"))
    again_points = json.loads((out / "results.json").read_text())["frontier"]["points"]
    assert again_points == points  # seeded: the point trained again gives the same numbers

    # A second run moves the first demo's folder aside (--overwrite), and is seeded: the same
    # settings give the same numbers.
    again = safebasin_cli("demo", "--quick", "--out", str(out), "--overwrite", cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["stages"] == result["stages"]
    moved, = tmp_path.glob(f"{out.name}.replaced-*")
    assert json.loads((moved / "results.json").read_text())["stages"] == result["stages"]


def test_seeds_are_aggregated_and_checked_on_the_means():
    from safebasin.launcher.config import ConfigError
    from safebasin.launcher.demo import TINY, parse_seeds
    from safebasin.safety_core.study import report, spec
    study, _ = spec.read(TINY)
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds(None) is None
    for bad in ("0,x", "1,1", ""):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)

    def stages(lora_hrr, restored_prefill):
        row = {"hrr": 0.0, "refusal": 1.0, "degenerate": 0.0, "prefill_asr": 0.5, "prefill_degenerate": 0.0,
               "task_accuracy": 0.9, "task_loss": 0.3}
        out = {name: dict(row) for name in STAGES}
        out["base"]["hrr"] = 1.0
        out["lora"].update(hrr=lora_hrr, refusal=1.0 - lora_hrr, prefill_asr=0.8)
        out["restored"]["prefill_asr"] = restored_prefill
        return out
    # One seed fails the erosion check and one the prefilling check; the means pass both.
    runs = [stages(0.5, 0.7), stages(0.1, 0.9), stages(0.6, 0.6)]
    assert not report.checks(study, runs[1])["attack erodes safety"]["ok"]
    assert not report.checks(study, runs[1])["restoration holds prefilling"]["ok"]
    agg = report.aggregate(runs)
    assert agg["lora"]["hrr"]["mean"] == pytest.approx(0.4)
    assert agg["lora"]["hrr"]["sd"] == pytest.approx(0.2645751, rel=1e-6)
    found = report.checks(study, report.means(agg))
    assert found["attack erodes safety"]["ok"] and found["restoration holds prefilling"]["ok"]
    text = report.table(study, report.means(agg), sd=agg, caption="under the table")
    assert "0.400 ± 0.265" in text and "attack: LoRA, harmful mix" in text and text.endswith("under the table")


def test_makefile_demo_target_runs_the_demo():
    text = (REPO / "Makefile").read_text()
    recipe = text.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "safebasin demo" in recipe
