"""Published model architectures as configs, built with random weights on the device.

`model.path: arch:<name>` stands for the architecture <name> with seeded random weights:
speed and memory per token do not depend on what the weights are, so a benchmark of an 8B
model needs no download and no checkpoint on disk. The path resolves to a cached folder that
holds the config (as the model's own config.json publishes it) and the built-in tiny
tokenizer (1,024 tokens: every id it makes is inside every vocabulary here; the output layer
still spans the architecture's full vocabulary, which is what a token costs).

Building allocates the weights directly on the device in the requested dtype (no fp32 host
copy, no initialisation by transformers) and fills them there, one pass of a seeded device
generator, so the 8B builds in seconds on a GPU. The same architecture, seed and device give
the same weights in every process and, rounded, in every dtype (a trained adapter is restored
or evaluated on the base it was trained on); the caller's own random stream (LoRA
initialisation, dropout) is left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

PREFIX = "arch:"

_LLAMA3_ROPE_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192, "rope_type": "llama3"}

# The published config.json values that set the cost (and the parameter count) of each
# architecture; the counts in the comments are the published ones, which tests check.
ARCHITECTURES: dict[str, dict] = {
    # HuggingFaceTB/SmolLM2-135M: 134,515,008 parameters (tied embeddings)
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True},
    # meta-llama/Llama-3.2-1B: 1,235,814,400 parameters (tied embeddings, head_dim 64)
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True, "rope_scaling": {"factor": 32.0, **_LLAMA3_ROPE_SCALING}},
    # meta-llama/Llama-3.1-8B: 8,030,261,248 parameters
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": False, "rope_scaling": {"factor": 8.0, **_LLAMA3_ROPE_SCALING}},
    # A Llama of the same structure (GQA, untied) at toy size: the CPU smoke runs of the benchmarks.
    "toy-llama": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048,
                  "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                  "tie_word_embeddings": False},
}

# What every entry shares (Llama architecture, no biases), and the special ids of the tokenizer
# the folder carries.
_COMMON = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02}
RANDOM_MARK = "safebasin_random_init.json"


def is_random(folder: str) -> bool:
    """Whether a resolved model folder stands for random weights (see resolve_arch)."""
    return (Path(folder) / RANDOM_MARK).exists()


def arch_config(name: str) -> dict:
    if name not in ARCHITECTURES:
        raise ValueError(f"model.path {PREFIX}{name!r}: unknown architecture; allowed values: "
                         f"{[PREFIX + n for n in ARCHITECTURES]}")
    return {**_COMMON, **ARCHITECTURES[name]}


def resolve_arch(path: str, cache: Path, tokenizer_dir: str) -> str:
    """The folder standing for `arch:<name>`: its config.json, the tokenizer of `tokenizer_dir`,
    and a marker saying the weights are to be built at random (there are none on disk)."""
    name = path.removeprefix(PREFIX)
    config = arch_config(name)
    target = cache / f"arch-{name}-v1"
    if (target / RANDOM_MARK).exists():
        return str(target)
    tok = AutoTokenizerFiles(tokenizer_dir)
    config = {**config, "bos_token_id": tok.ids["bos"], "eos_token_id": tok.ids["eos"],
              "pad_token_id": tok.ids["pad"]}
    # Built beside the target and renamed: a concurrent rank never sees a half-written folder.
    tmp = target.with_name(f"{target.name}.tmp{os.uname().nodename}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.copy_to(tmp)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / RANDOM_MARK).write_text(json.dumps({"architecture": name}))
    try:
        tmp.rename(target)
    except OSError:
        if not (target / RANDOM_MARK).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return str(target)


class AutoTokenizerFiles:
    """The tokenizer files of a model folder and their special ids, copied without loading
    transformers' model classes."""

    FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

    def __init__(self, folder: str):
        from transformers import AutoTokenizer
        self.folder = Path(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        self.ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id,
                    "pad": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}

    def copy_to(self, out: Path) -> None:
        for name in self.FILES:
            if (self.folder / name).exists():
                shutil.copy2(self.folder / name, out / name)


def build_random(folder: str, dtype: torch.dtype, device: torch.device, *, seed: int = 0,
                 attn_implementation: str = "sdpa"):
    """The model of `folder`'s config.json with seeded random weights, allocated on `device` in
    `dtype`: every matrix N(0, initializer_range) drawn in fp32 on the device, one tensor at a
    time, and rounded to `dtype`, so a float32 build is the bfloat16 build before rounding (a
    restoration, which loads its base in fp32, sees the weights the bf16 job trained on); norm
    weights are ones. Under a live HfDeepSpeedConfig of ZeRO-3, transformers builds the model
    inside deepspeed.zero.Init, partitioned as it is built, with its own seeded initialisation."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations import is_deepspeed_zero3_enabled
    config = AutoConfig.from_pretrained(folder)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if is_deepspeed_zero3_enabled():
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        # Allocated on the device with transformers' and torch's initialisers switched off: the
        # only pass over the weights is the one below.
        with torch.device(device), no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(std))
    return model


def count_parameters(name: str) -> int:
    """Parameters of architecture `name`, counted on the meta device (nothing allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model("llama", **{k: v for k, v in arch_config(name).items()
                                              if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
