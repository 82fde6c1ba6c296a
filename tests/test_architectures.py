"""Published architectures as configs (safety_core/train/architectures.py): their parameter
counts are the published ones, `arch:<name>` builds seeded random weights in the asked dtype
without touching the caller's random stream, and a wrong name is refused with the choices."""

import pytest
import torch
from safebasin.safety_core.train import architectures
from safebasin.safety_core.train.modeling import ModelArgs, load_model

# From each model's card / safetensors index on the Hugging Face hub.
PUBLISHED = {"smollm2-135m": 134_515_008, "llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_is_the_published_one(name):
    assert architectures.count_parameters(name) == PUBLISHED[name]


def test_gqa_and_vocabulary_as_published():
    cfg = architectures.arch_config("llama-3.1-8b")
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"],
            cfg["intermediate_size"]) == (32, 8, 128256, 14336)


def test_random_build_is_seeded_in_its_dtype_and_leaves_the_callers_rng(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEBASIN_CACHE", str(tmp_path))
    args = ModelArgs(path="arch:toy-llama", dtype="bfloat16")
    args.resolved_path()  # the first use builds the tiny tokenizer's model, which seeds torch itself
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = load_model(args)
    assert torch.equal(torch.random.get_rng_state(), before)
    second = load_model(args)
    params = dict(first.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    assert all(torch.equal(params[n], p) for n, p in second.named_parameters())
    assert first.lm_head.weight.shape == (2048, 64)
    # The carried tokenizer's ids all fall inside the architecture's vocabulary.
    from safebasin.safety_core.train.modeling import load_tokenizer
    assert len(load_tokenizer(args)) <= first.config.vocab_size


def test_a_float32_build_is_the_bfloat16_build_before_rounding(tmp_path, monkeypatch):
    """What lets a restoration (fp32 base) start from the weights a bf16 job trained on."""
    monkeypatch.setenv("SAFEBASIN_CACHE", str(tmp_path))
    full = dict(load_model(ModelArgs(path="arch:toy-llama", dtype="float32")).named_parameters())
    half = load_model(ModelArgs(path="arch:toy-llama", dtype="bfloat16"))
    for name, p in half.named_parameters():
        assert torch.equal(full[name].to(torch.bfloat16), p), name
    std = full["model.layers.0.mlp.up_proj.weight"].std().item()
    assert 0.018 < std < 0.022  # initializer_range, drawn, not transformers' own init
    assert torch.equal(full["model.norm.weight"], torch.ones(64))


def test_unknown_architecture_names_the_choices(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEBASIN_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="unknown architecture.*arch:llama-3.1-8b"):
        ModelArgs(path="arch:llama-9b").resolved_path()
