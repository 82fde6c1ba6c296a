"""Every input a job config names, checked on the launching process before any rank starts:
local model and adapter folders (there, and holding weights), the anchor basis against the
model's modules and shapes, method.target_modules against the model, data files and built-in
sets, hub ids and dataset names when offline, and the output folder (writable, apart from every
input). Cheap: config.json, safetensors headers and basis manifests are read, never weights.
Each problem is one line that names the key and the path.
"""

from __future__ import annotations

import os
from pathlib import Path

from safebasin.launcher.config import ConfigError, JobConfig
from safebasin.launcher.outputs import overlap_problems, writable_problem

MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_TRUE = ("1", "true", "yes", "on")


def _flag(*names: str) -> bool:
    return any(os.environ.get(n, "").strip().lower() in _TRUE for n in names)


def hub_offline() -> bool:
    return _flag("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def datasets_offline() -> bool:
    return _flag("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def looks_local(value: str) -> bool:
    """A path, not a hub id: hub ids are NAME or OWNER/NAME, never absolute, dotted or deeper."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or value.endswith("/") or "\\" in value


def inputs_of(cfg: JobConfig) -> list[tuple[str, str, str, str | None]]:
    """(dotted key, value, kind, detail) of every input the config names; kind is model,
    adapter, basis or data (detail: its subset). Model sections (path + adapter) and data sources
    (path + split) are found wherever they sit (model, landscape.reference, restore.forget, ...)."""
    found = []

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            if "path" in node and "adapter" in node:
                found.append((f"{prefix}path", node["path"], "model", node.get("revision")))
                if node["adapter"]:
                    found.append((f"{prefix}adapter", node["adapter"], "adapter", None))
            elif "path" in node and "split" in node:
                found.append((f"{prefix}path", node["path"], "data", node.get("subset")))
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{prefix[:-1]}[{i}].")

    walk(cfg.model_dump(mode="json", by_alias=True), "")
    if cfg.anchor is not None:
        found.append(("anchor.basis", cfg.anchor.basis, "basis", None))
    return found


def local_value(value: str, kind: str) -> str:
    """Where an input lies on this disk (a built-in model: its cache folder)."""
    if kind == "model" and value.startswith("builtin:"):
        from safebasin.safety_core.train.tiny import resolve_builtin_model
        return resolve_builtin_model(value)
    return value


def folder_problem(key: str, value: str, kind: str, revision: str | None = None) -> str | None:
    """A model or adapter folder: there and holding weights; a hub id: in the cache when offline."""
    if kind == "model" and value.startswith("builtin:"):
        from safebasin.safety_core.train.pretrained import MODELS
        from safebasin.safety_core.train.tiny import BUILTIN_TINY
        known = [BUILTIN_TINY] + [f"builtin:{name}" for name in sorted(MODELS)]
        return None if value in known else f"{key}: unknown built-in model {value!r}; the built-in " \
                                           f"models are {', '.join(known)}"
    config_name, weights = ("config.json", MODEL_WEIGHTS) if kind == "model" else \
        ("adapter_config.json", ADAPTER_WEIGHTS)
    path = Path(os.path.expanduser(value))
    if path.exists():
        if not path.is_dir():
            return f"{key} {value}: not a folder ({'a model folder' if kind == 'model' else 'a PEFT adapter folder'} " \
                   f"holds {config_name} and weights)"
        if not (path / config_name).is_file():
            return f"{key} {value}: no {config_name} in the folder; not a " \
                   f"{'model' if kind == 'model' else 'PEFT adapter'} folder"
        if not any((path / w).is_file() for w in weights):
            return f"{key} {value}: {config_name} but no weights (looked for {', '.join(weights)})"
        return _missing_shards(key, path)
    if looks_local(value):
        return f"{key} {value}: no such folder"
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError
        try:
            cached = try_to_load_from_cache(value, config_name, revision=revision)
        except HFValidationError:
            return f"{key} {value}: no such folder, and not a Hugging Face hub id"
        if not isinstance(cached, str):
            return f"{key} {value}: no such folder, and not in the Hugging Face cache (offline: " \
                   f"HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set, so it cannot be downloaded)"
    return None


def _missing_shards(key: str, folder: Path) -> str | None:
    import json
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text()).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                return f"{key} {folder}: {index} lists {len(missing)} shard(s) that are not there, e.g. {missing[0]}"
    return None


def data_problem(key: str, value: str, subset: str | None) -> str | None:
    from safebasin.safety_core.train.data import LOCAL_SUFFIXES
    if value.startswith("builtin:"):
        from safebasin.safety_core.train.synthetic import BUILTIN_SETS
        name = value.removeprefix("builtin:")
        return None if name in BUILTIN_SETS else \
            f"{key}: unknown built-in data set {value!r}; available: {', '.join('builtin:' + n for n in BUILTIN_SETS)}"
    path = Path(value)
    if path.suffix.lower() in LOCAL_SUFFIXES or looks_local(value) or path.exists():
        if not path.exists():
            return f"{key} {value}: no such file"
        if not path.is_file() or path.suffix.lower() not in LOCAL_SUFFIXES:
            return f"{key} {value}: not a data file; use one of {', '.join(LOCAL_SUFFIXES)}"
        return None
    if datasets_offline():
        import datasets
        try:
            datasets.load_dataset_builder(value, subset)
        except (OSError, ValueError) as e:
            return f"{key} {value}: no such file, and not a data set in the Hugging Face cache " \
                   f"(offline: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def _model_weights(cfg: JobConfig):
    """Lazy safetensors view of the model's weights (names normalised), or None when the model
    is not a local safetensors folder (a hub id, .bin weights)."""
    from safebasin.safety_core.anchor.basis import BasisError, Checkpoint
    path = Path(os.path.expanduser(cfg.model.resolved_path()))
    if not path.is_dir():
        return None
    try:
        return Checkpoint(path, "model.path")
    except BasisError:
        return None


def module_problems(cfg: JobConfig, command: str) -> list[str]:
    """method.target_modules entries that match no module, and an anchor basis whose layers are
    not the model's (names and shapes), from the safetensors header."""
    weights = _model_weights(cfg)
    if weights is None:
        return []
    from safebasin.safety_core.anchor.basis import module_of
    shapes = {module_of(n): weights.shape(n) for n in weights.names() if n.endswith(".weight")}
    problems = []
    trains_new_lora = command == "train" and cfg.method.type == "lora" and not cfg.model.adapter
    if trains_new_lora:
        ends = sorted({m.rsplit(".", 1)[-1] for m, s in shapes.items() if len(s) == 2})
        for target in cfg.method.target_modules:
            if target != "all-linear" and not any(m == target or m.endswith("." + target) for m in shapes):
                problems.append(f"method.target_modules: {target!r} matches no module of {cfg.model.path} "
                                f"(its linear modules end in {', '.join(ends)})")
    if cfg.anchor is not None and cfg.anchor.basis is not None and command == "train":
        problems += _basis_problems(cfg, shapes, trains_new_lora)
    return problems


def _basis_problems(cfg: JobConfig, shapes: dict, trains_new_lora: bool) -> list[str]:
    from safebasin.safety_core.anchor.basis import load_basis
    basis = load_basis(cfg.anchor.basis)
    # The rule training uses (Basis.match), so preflight and the anchor never disagree on which
    # module a basis layer belongs to.
    matched: dict[str, list[str]] = {}
    for module in shapes:
        name = basis.match(module)
        if name is not None:
            matched.setdefault(name, []).append(module)
    absent = [name for name in basis.names if name not in matched]
    wrong = [f"{name} is {list(basis.manifest['layers'][name]['shape'])} in the basis, {list(shapes[m])} in the model"
             for name, modules in matched.items() for m in modules
             if list(shapes[m]) != list(basis.manifest["layers"][name]["shape"])]
    problems = []
    if absent:
        problems.append(f"anchor.basis {cfg.anchor.basis}: {len(absent)} of its {len(basis.names)} layers are "
                        f"not modules of {cfg.model.path}, e.g. {absent[0]!r}; extract the basis from this model")
    if wrong:
        problems.append(f"anchor.basis {cfg.anchor.basis}: {len(wrong)} layer(s) do not match the model's "
                        f"shapes, e.g. {wrong[0]}; extract the basis from this model")
    if trains_new_lora and not problems:
        trained = [m for m in shapes if len(shapes[m]) == 2 and any(m == t or m.endswith("." + t)
                                                                     for t in cfg.method.target_modules)]
        unanchored = [m for m in trained if basis.match(m) is None]
        if unanchored:
            problems.append(f"anchor.basis {cfg.anchor.basis}: method.target_modules trains {len(unanchored)} "
                            f"module(s) the basis has no layer for, e.g. {unanchored[0]!r}; extract the basis "
                            f"with --modules covering every trained module")
    return problems


def check_inputs(cfg: JobConfig, command: str) -> None:
    """Raise ConfigError with one line per problem of the config's inputs and output folder."""
    found = inputs_of(cfg)
    problems = []
    for key, value, kind, detail in found:
        if kind in ("model", "adapter"):
            problem = folder_problem(key, value, kind, detail)
        elif kind == "basis":
            problem = cfg.anchor.basis_problem()
            problem = f"anchor.basis: {problem}" if problem else None
        else:
            problem = data_problem(key, value, detail)
        if problem:
            problems.append(problem)
    out = cfg.output.dir
    problems += overlap_problems("output.dir", out, [(k, local_value(v, kind)) for k, v, kind, _ in found])
    problem = writable_problem("output.dir", out)
    if problem:
        problems.append(problem)
    if command == "eval" and cfg.eval is not None and cfg.eval.engine == "vllm":
        from safebasin.safety_core.measure.vllm_engine import vllm_lora_rank, vllm_problem
        problem = vllm_problem()
        if problem:
            problems.append(problem)
        elif cfg.model.adapter is not None and Path(cfg.model.adapter, "adapter_config.json").is_file():
            try:
                vllm_lora_rank(cfg.model.adapter)
            except ValueError as e:
                problems.append(str(e))
    # The modules are read from the model's files: only when the model and basis checks passed.
    if not any(p.startswith(("model.", "anchor.basis")) for p in problems):
        problems += module_problems(cfg, command)
    if problems:
        raise ConfigError(problems)

