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

ALLOWED = ("hf", "vllm")


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

    def __init__(self, model_args, gpu_memory_utilization: float = 0.6):
        from transformers import GenerationConfig
        from vllm import LLM
        path = model_args.resolved_path()
        self.adapter = model_args.adapter
        lora_rank = None
        if self.adapter is not None:
            lora_rank = json.loads((Path(self.adapter) / "adapter_config.json").read_text())["r"]
        dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[model_args.dtype]
        self.llm = LLM(model=path, tokenizer=path, dtype=dtype, seed=0, enable_lora=self.adapter is not None,
                       max_lora_rank=lora_rank or 16, gpu_memory_utilization=gpu_memory_utilization,
                       trust_remote_code=model_args.trust_remote_code)
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
