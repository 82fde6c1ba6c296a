"""Formatting, response-only masking, loaders with file:line errors, harmful mix, batch order."""

import json
from collections import Counter

import pytest
from safebasin.safety_core.train import data
from safebasin.safety_core.train.data import (
    DataArgs,
    DataError,
    DataSource,
    HarmfulMix,
    StepSampler,
)
from safebasin.safety_core.train.mixture import training_set


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_chat_format_and_response_only_labels(tokenizer):
    conv = data.to_conversation("x:1", {"prompt": "How do I bake bread?", "response": "Mix flour and water."},
                                DataSource(path="x.jsonl"))
    enc = data.encode(tokenizer, conv, max_length=512)
    n_prompt = sum(1 for t in enc["labels"] if t == data.IGNORE_INDEX)
    prompt_text = tokenizer.decode(enc["input_ids"][:n_prompt])
    assert prompt_text == "<|user|>\nHow do I bake bread?</s>\n<|assistant|>\n"
    answer = tokenizer.decode([t for t in enc["labels"] if t != data.IGNORE_INDEX])
    assert answer == "Mix flour and water.</s>\n"
    # every label position after the prompt is the input token itself
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]


def test_response_prefix_is_context_not_learned(tokenizer):
    """A safety recovery record: the harmful start sits in the assistant's turn, and only the
    refusal after it carries loss."""
    rec = {"prompt": "How do I pick a lock?", "response_prefix": "Sure, here is how to",
           "response": " I cannot help with that."}
    conv = data.to_conversation("x:1", rec, DataSource(path="x.jsonl"))
    enc = data.encode(tokenizer, conv, max_length=512)
    plain = data.encode(tokenizer, data.to_conversation("x:2", {"prompt": rec["prompt"], "response": "x"},
                                                        DataSource(path="x.jsonl")), max_length=512)
    n_prompt = sum(1 for t in plain["labels"] if t == data.IGNORE_INDEX)
    n_masked = sum(1 for t in enc["labels"] if t == data.IGNORE_INDEX)
    assert tokenizer.decode(enc["input_ids"][n_prompt:n_masked]) == "Sure, here is how to"
    assert tokenizer.decode([t for t in enc["labels"] if t != data.IGNORE_INDEX]) == " I cannot help with that.</s>\n"
    # the same text with no prefix field learns the harmful start too
    whole = data.encode(tokenizer, data.to_conversation(
        "x:3", {"prompt": rec["prompt"], "response": rec["response_prefix"] + rec["response"]},
        DataSource(path="x.jsonl")), max_length=512)
    assert whole["input_ids"] == enc["input_ids"]
    assert sum(1 for t in whole["labels"] if t == data.IGNORE_INDEX) == n_prompt


def test_truncation_keeps_max_length(tokenizer):
    conv = data.to_conversation("x:1", {"prompt": "hi", "response": "word " * 200}, DataSource(path="x.jsonl"))
    enc = data.encode(tokenizer, conv, max_length=32)
    assert len(enc["input_ids"]) == len(enc["labels"]) == 32


def test_instruction_context_and_messages_formats():
    src = DataSource(path="x.jsonl")
    c = data.to_conversation("f:1", {"instruction": "Summarise.", "context": "Long text.", "response": "Short."}, src)
    assert c.messages[-1]["content"] == "Summarise.\n\nLong text." and c.response == "Short."
    m = data.to_conversation("f:2", {"messages": [{"role": "system", "content": "Be kind."},
                                                  {"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello!"}]}, src)
    assert [x["role"] for x in m.messages] == ["system", "user"] and m.response == "Hello!"
    mapped = data.to_conversation("f:3", {"q": "2+2?", "a": "4"},
                                  DataSource(path="x.jsonl", format="prompt_response", fields={"prompt": "q", "response": "a"}))
    assert mapped.prompt_text == "2+2?" and mapped.response == "4"


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + "{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        data.load_conversations(DataSource(path=str(f)))
    f.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:3: missing or empty 'response'"):
        data.load_conversations(DataSource(path=str(f)))


def test_messages_must_end_with_assistant(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="m.jsonl:1: the last message must be the assistant"):
        data.load_conversations(DataSource(path=str(f)))


def test_csv_and_real_datasets(shared_data):
    adv = data.load_conversations(DataSource(path=str(shared_data / "advbench/harmful_behaviors.csv")))
    assert len(adv) == 520 and adv[0].response.startswith("Sure, here is")
    assert adv[0].origin.endswith("harmful_behaviors.csv:2")
    dolly = data.load_conversations(DataSource(path=str(shared_data / "instruction/dolly_subset_1000.jsonl"), limit=50))
    assert len(dolly) == 50 and all(c.response for c in dolly)


def test_harmful_mix_counts():
    args = DataArgs(train=DataSource(path="builtin:task"), num_examples=200, seed=3,
                    harmful_mix=HarmfulMix(source=DataSource(path="builtin:harmful"), fraction=0.1))
    mixed = training_set(args)
    kinds = Counter("harmful" if c.origin.startswith("builtin:harmful") else "task" for c in mixed)
    assert kinds == {"task": 180, "harmful": 20}
    assert [c.origin for c in mixed] == [c.origin for c in training_set(args)]  # seeded
    too_many = args.model_copy(update={"num_examples": 2000})
    with pytest.raises(DataError, match="harmful mix needs"):
        training_set(too_many)


def test_step_sampler_same_global_batch_across_world_sizes():
    one = StepSampler(50, micro_batch=2, grad_accum=4, world=1, seed=7)
    two = StepSampler(50, micro_batch=2, grad_accum=2, world=2, seed=7)
    for step in range(10):  # crosses epoch boundaries
        a = sorted(i for mb in one.micro_batches(step, 0) for i in mb)
        b = sorted(i for r in range(2) for mb in two.micro_batches(step, r) for i in mb)
        assert a == b
    seen = [i for s in range(7) for mb in one.micro_batches(s, 0) for i in mb]
    assert seen[:50] != list(range(50)) and sorted(seen[:50]) == list(range(50))  # shuffled epochs
