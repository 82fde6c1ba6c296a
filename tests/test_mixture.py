"""Training data from config alone: source mixtures, filters, prompt templates, and the data
summary every training job prints and logs."""

import csv
import json
from collections import Counter

import pytest
from pydantic import ValidationError
from safebasin.safety_core.train import data
from safebasin.safety_core.train.data import DataArgs, DataError, DataSource
from safebasin.safety_core.train.mixture import apportion, training_set_with_report
from safebasin.safety_core.train.summary import (
    data_summary,
    flat_metrics,
    format_summary,
)
from safebasin.safety_core.train.synthetic import write_jsonl


def _files(tmp_path):
    refusals = write_jsonl([{"instruction": f"Do harm {i}", "context": "", "response": f"I can't help with {i}."}
                            for i in range(30)], tmp_path / "refusals.jsonl")
    alpaca = write_jsonl([{"instruction": f"Task {i}", "context": "ctx" if i % 2 else "", "response": f"Done {i}."}
                          for i in range(100)], tmp_path / "alpaca.jsonl")
    harmful = write_jsonl([{"prompt": f"Bad {i}", "response": f"Sure {i}", "prompt_in_advbench": i % 3 == 0,
                            "is_safe": i % 5 == 0} for i in range(60)], tmp_path / "harmful.jsonl")
    return refusals, alpaca, harmful


def _args(**kw) -> DataArgs:
    return DataArgs.model_validate(kw)


def test_weighted_mixture_counts_are_exact_seeded_and_reported(tmp_path):
    refusals, alpaca, _ = _files(tmp_path)
    args = _args(train=[{"path": str(refusals), "weight": 1}, {"path": str(alpaca), "weight": 1}],
                 num_examples=41, seed=5)
    convs, report = training_set_with_report(args)
    by_source = Counter(c.source for c in convs)
    assert by_source == {"refusals": 21, "alpaca": 20}  # 20.5 each: the remainder goes to the first
    assert [s.taken for s in report.sources] == [21, 20] and report.to_dict()["examples"] == 41
    assert len({c.origin for c in convs}) == 41  # no example drawn twice
    again, _ = training_set_with_report(args)
    assert [c.origin for c in again] == [c.origin for c in convs]
    other, _ = training_set_with_report(args.model_copy(update={"seed": 6}))
    assert [c.origin for c in other] != [c.origin for c in convs]
    # Without num_examples: the largest 50/50 set the sources supply (30 refusals -> 60).
    convs, _ = training_set_with_report(args.model_copy(update={"num_examples": None}))
    assert Counter(c.source for c in convs) == {"refusals": 30, "alpaca": 30}


def test_counts_weights_pooling_and_their_errors(tmp_path):
    refusals, alpaca, _ = _files(tmp_path)
    counted = _args(train=[{"path": str(refusals), "count": 10}, {"path": str(alpaca), "weight": 3}], num_examples=50)
    assert Counter(c.source for c in training_set_with_report(counted)[0]) == {"refusals": 10, "alpaca": 40}
    pooled = _args(train=[{"path": str(refusals)}, {"path": str(alpaca), "name": "alp"}])
    assert Counter(c.source for c in training_set_with_report(pooled)[0]) == {"refusals": 30, "alp": 100}
    pooled_n = pooled.model_copy(update={"num_examples": 26})  # in proportion to the sizes, 30:100
    assert Counter(c.source for c in training_set_with_report(pooled_n)[0]) == {"refusals": 6, "alp": 20}
    with pytest.raises(DataError, match="'refusals': count 31 but it has 30 records"):
        training_set_with_report(_args(train=[{"path": str(refusals), "count": 31}]))
    with pytest.raises(DataError, match="neither weight nor count"):
        training_set_with_report(_args(train=[{"path": str(refusals), "weight": 1}, {"path": str(alpaca)}]))
    with pytest.raises(DataError, match="'refusals': its share is 40 examples but it has 30"):
        training_set_with_report(_args(train=[{"path": str(refusals), "weight": 1},
                                              {"path": str(alpaca), "weight": 1}], num_examples=80))
    with pytest.raises(DataError, match="counts add up to 40, more than the 30"):
        training_set_with_report(_args(train=[{"path": str(refusals), "count": 10},
                                              {"path": str(alpaca), "count": 30}], num_examples=30))
    with pytest.raises(ValidationError, match="either weight or count"):
        _args(train=[{"path": str(refusals), "weight": 1, "count": 3}])
    assert apportion(7, [1, 1, 1]) == [3, 2, 2] and apportion(10, [0.25, 0.75]) == [3, 7]


def test_single_source_mapping_still_works(tmp_path):
    _, alpaca, _ = _files(tmp_path)
    args = _args(train={"path": str(alpaca)}, num_examples=10, seed=1)
    assert isinstance(args.train, DataSource)
    convs, report = training_set_with_report(args)
    assert len(convs) == 10 and report.sources[0].taken == 10 and report.sources[0].available == 100


def test_filter_equality_and_lists_before_limit_counted(tmp_path):
    _, _, harmful = _files(tmp_path)
    rows, dropped = data.read_source(DataSource(path=str(harmful), filter={"prompt_in_advbench": False}))
    assert len(rows) == 40 and dropped == 20
    assert all(not rec["prompt_in_advbench"] for _, rec in rows)
    rows, dropped = data.read_source(DataSource(path=str(harmful), filter={"prompt_in_advbench": False,
                                                                           "is_safe": False}, limit=5))
    assert [rec["prompt"] for _, rec in rows] == ["Bad 1", "Bad 2", "Bad 4", "Bad 7", "Bad 8"]  # limit after filter
    assert dropped == 4  # 0, 3, 5, 6 were read and dropped before the limit was reached
    rows, _ = data.read_source(DataSource(path=str(harmful), filter={"prompt": ["Bad 2", "Bad 9", "nope"]}))
    assert [rec["prompt"] for _, rec in rows] == ["Bad 2", "Bad 9"]
    with pytest.raises(DataError, match=r"harmful.jsonl:1: filter field 'is_unsafe' is not in the record"):
        data.read_source(DataSource(path=str(harmful), filter={"is_unsafe": True}))
    # CSV cells are text: 'False' matches false, '0' matches 0.
    with (tmp_path / "h.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["prompt", "response", "is_safe", "n"], ["a", "x", "False", "0"], ["b", "y", "True", "1"]])
    rows, dropped = data.read_source(DataSource(path=str(tmp_path / "h.csv"), filter={"is_safe": False, "n": 0}))
    assert [rec["prompt"] for _, rec in rows] == ["a"] and dropped == 1
    # true is not 1
    flags = write_jsonl([{"prompt": "p", "response": "r", "f": 1}], tmp_path / "flags.jsonl")
    assert data.read_source(DataSource(path=str(flags), filter={"f": True}))[0] == []


def test_harmful_mix_with_filter_and_mixture_reports_splits(tmp_path):
    refusals, alpaca, harmful = _files(tmp_path)
    args = _args(train=[{"path": str(refusals), "weight": 1}, {"path": str(alpaca), "weight": 1}],
                 harmful_mix={"source": {"path": str(harmful), "filter": {"prompt_in_advbench": False}},
                              "fraction": 0.2}, num_examples=50)
    convs, report = training_set_with_report(args)
    assert len(convs) == 50 and sum(c.harmful for c in convs) == 10
    assert all(not c.record["prompt_in_advbench"] for c in convs if c.harmful)
    assert Counter(c.source for c in convs if not c.harmful) == {"refusals": 20, "alpaca": 20}
    d = report.to_dict()
    assert (d["harmful"], d["benign"]) == (10, 40)
    assert [(s.name, s.harmful, s.filtered_out, s.taken) for s in report.sources] == [
        ("refusals", False, 0, 20), ("alpaca", False, 0, 20), ("harmful", True, 20, 10)]


def test_training_template_renders_fields_and_names_bad_records(tmp_path):
    sst = write_jsonl([{"sentence": "a fine film ", "label": 1, "label_text": "positive"},
                       {"sentence": "", "label": 0, "label_text": "negative"}], tmp_path / "sst.jsonl")
    src = DataSource(path=str(sst), template="Classify the sentiment as positive or negative.\n\n{sentence}",
                     fields={"response": "label_text"})
    conv = data.to_conversation("sst.jsonl:1", json.loads(sst.read_text().splitlines()[0]), src, "Be brief.")
    assert conv.messages == ({"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Classify the sentiment as positive or negative.\n\na fine film"})
    assert conv.response == "positive"
    with pytest.raises(DataError, match=r"sst.jsonl:2: template field \{sentence\} is missing or empty"):
        data.load_conversations(src)
    # {prompt} is the format's prompt (instruction and context here); other fields work beside it.
    inst = DataSource(path="x.jsonl", template="{prompt}\n(Answer as {persona}.)")
    conv = data.to_conversation("x:1", {"instruction": "Sum up.", "context": "Text.", "response": "Ok.",
                                        "persona": "a critic"}, inst)
    assert conv.prompt_text == "Sum up.\n\nText.\n(Answer as a critic.)"
    with pytest.raises(ValidationError, match="no placeholder"):
        DataSource(path="x.jsonl", template="Classify this.")
    with pytest.raises(ValidationError, match="plain field name"):
        DataSource(path="x.jsonl", template="{0} and {a.b}")
    with pytest.raises(DataError, match="does not apply to chat 'messages'"):
        data.to_conversation("m:1", {"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "yo"}]},
                             DataSource(path="m.jsonl", template="{prompt}"))


def test_summary_counts_tokens_truncation_and_renders_one_example(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    _, alpaca, harmful = _files(tmp_path)
    long = write_jsonl([{"prompt": "Tell me everything.", "response": "word " * 80}] * 3, tmp_path / "long.jsonl")
    args = _args(train=[{"path": str(alpaca), "count": 9}, {"path": str(long), "count": 3}],
                 harmful_mix={"source": {"path": str(harmful), "filter": {"is_safe": False}}, "fraction": 0.25},
                 num_examples=16, max_length=48, system_prompt="You are careful.")
    convs, report = training_set_with_report(args)
    s = data_summary(tok, convs, report, args.max_length)
    lengths = [len(data.encode(tok, c, 10_000)["input_ids"]) for c in convs]
    assert s["examples"] == 16 and (s["benign"], s["harmful"]) == (12, 4)
    assert s["tokens"]["max"] == max(lengths) and s["tokens"]["mean"] == pytest.approx(sum(lengths) / 16)
    assert s["tokens"]["p95"] == sorted(lengths)[15]  # nearest rank: ceil(0.95 * 16) = 16th
    over = [n - 48 for n in lengths if n > 48]
    assert len(over) >= 3 and s["truncated"]["examples"] == len(over)
    assert s["truncated"]["tokens_cut_max"] == max(over)
    assert s["filtered_out"] == 12  # is_safe true on 0, 5, ..., 55
    ex = s["example"]
    assert ex["prompt"].startswith("<|system|>\nYou are careful.</s>\n<|user|>\n") and ex["prompt"].endswith("<|assistant|>\n")
    assert ex["prompt"] + ex["completion"] == tok.apply_chat_template(
        list(convs[0].messages) + [{"role": "assistant", "content": convs[0].response}], tokenize=False)
    text = format_summary(s)
    assert "16 examples (12 benign, 4 harmful)" in text and "12 dropped by the filter" in text
    assert "You are careful." in text
    m = flat_metrics(s)
    assert m["data.examples.alpaca"] == 9 and m["data.examples.long"] == 3 and m["data.filtered_out.harmful"] == 12


def test_train_job_prints_and_logs_the_data_summary(tmp_path, tiny_model_dir, mlflow_uri):
    """A training job from config alone (mixture, template, filtered harmful mix), as a user runs
    it with output to a pipe: the summary first, plain progress lines, no FutureWarning, and
    the summary in MLflow."""
    import mlflow
    import yaml
    from conftest import safebasin_cli
    refusals, alpaca, harmful = _files(tmp_path)
    sst = write_jsonl([{"sentence": f"film {i}", "label": i % 2, "label_text": ["negative", "positive"][i % 2]}
                       for i in range(40)], tmp_path / "sst.jsonl")
    cfg = {"model": {"path": "builtin:tiny-llama"},
           "method": {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
           "data": {"train": [{"path": str(refusals), "weight": 1}, {"path": str(alpaca), "weight": 1},
                              {"path": str(sst), "name": "sst2", "count": 8,
                               "template": "Sentiment of: {sentence}", "fields": {"response": "label_text"}}],
                    "harmful_mix": {"source": {"path": str(harmful), "filter": {"prompt_in_advbench": False}},
                                    "fraction": 0.25},
                    "num_examples": 32, "max_length": 64, "system_prompt": "Be safe."},
           "train": {"max_steps": 4, "micro_batch_size": 4, "log_every": 2},
           "deepspeed": {"stage": 2}, "tracking": {"experiment": "mix"}, "output": {"dir": str(tmp_path / "out")}}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(cfg))
    res = safebasin_cli("train", str(tmp_path / "mix.yaml"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "[safebasin] data: 32 examples (24 benign, 8 harmful)" in res.stdout
    assert "sst2: 8 taken of 40 records" in res.stdout and "harmful harmful: 8 taken of 40 records (20 dropped" in res.stdout
    assert "    | <|system|>\n    | Be safe.</s>" in res.stdout
    assert "[safebasin] train: 2/4 step, loss" in res.stderr and "[safebasin] train: 4/4 step" in res.stderr
    assert "\r" not in res.stderr and "FutureWarning" not in res.stderr
    summary = json.loads((tmp_path / "out" / "data_summary.json").read_text())
    assert [(s["name"], s["taken"]) for s in summary["sources"]] == [
        ("refusals", 8), ("alpaca", 8), ("sst2", 8), ("harmful", 8)]
    mlflow.set_tracking_uri(mlflow_uri)
    run_id = json.loads((tmp_path / "out" / "results.json").read_text())["mlflow_run_id"]
    metrics = mlflow.get_run(run_id).data.metrics
    assert metrics["data.examples"] == 32 and metrics["data.harmful"] == 8 and metrics["data.filtered_out.harmful"] == 20
    assert metrics["data.tokens_max"] == summary["tokens"]["max"]
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id)]
    assert "data_summary.json" in artifacts
