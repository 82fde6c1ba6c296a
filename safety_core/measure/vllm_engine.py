"""Generation through vLLM (`eval.engine: vllm`): the same prompts, prefilled target tokens and
end-of-turn ids as generation.generate (its `prepare` and `finish`), decoded greedily by vLLM's
continuous-batching engine instead of `model.generate`. GPU only, one process (vLLM shards a
model over GPUs itself). LoRA adapters are served as vLLM LoRA requests, unmerged.

May import: measure.generation. vllm is imported only here, and only when the engine is used.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from safebasin.safety_core.measure.generation import eos_ids, finish, prepare
from safebasin.safety_core.train import architectures

ALLOWED = ("hf", "vllm")
# The LoRA ranks vLLM's kernels are built for (max_lora_rank must be one of them).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(adapter: str | Path | None) -> int | None:
    """The max_lora_rank vLLM is started with for this adapter: the smallest rank it supports
    at or above the adapter's r. An adapter above vLLM's largest is refused before anything loads."""
    if adapter is None:
        return None
    r = json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]
    fit = next((k for k in VLLM_LORA_RANKS if k >= r), None)
    if fit is None:
        raise ValueError(f"model.adapter {adapter}: LoRA rank r={r} is above the largest rank vLLM serves "
                         f"({VLLM_LORA_RANKS[-1]}; allowed: {list(VLLM_LORA_RANKS)}); use eval.engine=hf, "
                         f"or merge the adapter into the model first")
    return fit


def needed_model_len(tokenizer, prompt_sets: list[list], new_tokens: int) -> int:
    """The context vLLM must size its KV cache for: the longest rendered prompt of any set plus
    the tokens generated after it (prefilled ones included). Without it vLLM sizes for the
    model's whole context (128k for Llama 3.1), which may not fit beside the weights."""
    from safebasin.safety_core.train.data import render_prompt
    longest = max((len(tokenizer(render_prompt(tokenizer, c.messages), add_special_tokens=False).input_ids)
                   for convs in prompt_sets for c in convs), default=0)
    return longest + new_tokens + 1  # the BOS a template without one gets


def vllm_problem(world_size: int = 1) -> str | None:
    """Why eval.engine=vllm cannot run here, or None. Cheap: nothing is imported."""
    if importlib.util.find_spec("vllm") is None:
        return ("eval.engine=vllm needs the vllm package, which is not installed (pip install vllm; "
                f"CUDA GPUs only); allowed: {list(ALLOWED)}; eval.engine=hf (the default) runs everywhere")
    import torch
    if not torch.cuda.is_available():
        return "eval.engine=vllm runs on CUDA GPUs only and this machine has none; use eval.engine=hf"
    if world_size != 1:
        return (f"eval.engine=vllm runs in one process (vLLM shards the model over GPUs itself); got "
                f"{world_size} ranks: launch the eval with --nproc 1")
    return None


class VllmEngine:
    """A vLLM engine for one model (and adapter) with generate's interface."""

    def __init__(self, model_args, gpu_memory_utilization: float = 0.6, max_model_len: int | None = None):
        from transformers import GenerationConfig
        from vllm import LLM
        path = model_args.resolved_path()
        self.adapter = model_args.adapter
        lora_rank = vllm_lora_rank(self.adapter)
        dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[model_args.dtype]
        # An arch: folder has no weights: vLLM fills its own random ones (speed runs only; its
        # answers are not the hf engine's).
        weights = {"load_format": "dummy"} if architectures.is_random(path) else {}
        self.llm = LLM(model=path, tokenizer=path, dtype=dtype, seed=0, enable_lora=self.adapter is not None,
                       max_lora_rank=lora_rank or 16, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, trust_remote_code=model_args.trust_remote_code, **weights)
        try:
            self.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # a model folder without generation_config.json: the tokenizer's eos only
            self.generation_config = None

    def generate_conversations(self, tokenizer, conversations, *, max_new_tokens: int, prefill_tokens: int,
                               progress: bool, desc: str):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        stop = eos_ids(self, tokenizer)
        items = prepare(tokenizer, conversations, prefill_tokens, stop)
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=stop, detokenize=False)
        lora = LoRARequest("adapter", 1, str(self.adapter)) if self.adapter is not None else None
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p + f) for _, _, p, f in items], params,
                                    lora_request=lora, use_tqdm=progress)
        done = [finish(item, list(out.outputs[0].token_ids), stop, tokenizer) for item, out in zip(items, outputs)]
        return [g for _, g in sorted(done, key=lambda x: x[0])]

    def close(self) -> None:
        """Free the GPU memory vLLM holds, before the transformers copy for the task loss loads:
        two copies of an 8B model need not fit on one GPU."""
        import gc

        import torch
        del self.llm
        gc.collect()
        torch.cuda.empty_cache()
