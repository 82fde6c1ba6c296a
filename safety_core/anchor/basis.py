"""The alignment basis: per targeted linear layer, the top left singular vectors U_k of
V = W_aligned - W_base and the weights c of the anchor C = U_k diag(c) U_k^T.

(Over 300 lines: extraction, the spectrum rule that picks k and the reader of the result share
the on-disk format defined here; splitting them would spread one format over three files.)

Checkpoints are read one tensor pair at a time through safetensors' lazy `safe_open`, so two
full models are never in memory; only the small U_k, c and spectra of the layers done so far
are held, and they are flushed to shard files as they grow.

Output folder:
    manifest.json               variant, models, modules, selection rule, per-layer k/shape/
                                ||V||_F (fro_norm)/c_max/c_median/...
    basis-00001.safetensors...  "<layer>.U" (d_out x k), "<layer>.c" (k), "<layer>.S" (spectrum)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safebasin.safety_core.train.tiny import resolve_builtin_model

FORMAT = "safebasin-basis/1"
VARIANTS = ("safelora", "projector")
DEFAULT_MODULES = ("q_proj", "v_proj")
DEFAULT_TOL = 0.01
MANIFEST = "manifest.json"
# Above this many elements in the smaller dimension an extraction uses the randomised low-rank
# SVD (when k is small next to it); below it the exact SVD is cheap and gives the whole spectrum.
LOWRANK_MIN_DIM = 1024
# Oversampling max(16, k) and 8 power iterations: on slowly decaying spectra (close leading
# singular values) a bare k + 16 with few iterations misses a visible part of the subspace.
OVERSAMPLE = 16
LOWRANK_ITERS = 8
# First width of the randomised SVD when k comes from --tol (widened until it suffices).
LOWRANK_START = 64
SHARD_BYTES = 1 << 30
PEFT_PREFIX = "base_model.model."

TOL_HELP = ("with e_i = sigma_i^2 the energies of V = W_aligned - W_base (sum e_i = ||V||_F^2), "
            "k is the smallest k with sum_{i>k} e_i <= T * sum_i e_i. For the safelora variant "
            "c_i is proportional to e_i, so this is also the dropped share of sum c_i.")


class BasisError(ValueError):
    """The checkpoints or the options cannot give a basis; the message names the tensor."""


# ---------------------------------------------------------------------------------------------
# Reading checkpoints tensor by tensor


def resolve_model_dir(path_or_id: str) -> Path:
    """A local folder (or .safetensors file) as it is; builtin:tiny-llama built on first use;
    anything else is a hub id, fetched (safetensors and JSON only) with snapshot_download."""
    resolved = resolve_builtin_model(path_or_id)
    if Path(resolved).exists():
        return Path(resolved)
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(resolved, allow_patterns=["*.safetensors", "*.json"]))


class Checkpoint:
    """Lazy access to the tensors of a safetensors checkpoint (single file or index-sharded),
    keyed by normalised name (PEFT wrapper prefixes and `base_layer` removed)."""

    def __init__(self, path: str | Path, label: str):
        self.label = label
        root = Path(path)
        if root.is_file():
            files = {None: root}
        else:
            index = root / "model.safetensors.index.json"
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {name: root / f for name, f in weight_map.items()}
            elif (root / "model.safetensors").exists():
                files = {None: root / "model.safetensors"}
            else:
                raise BasisError(f"{label} {root}: no model.safetensors or model.safetensors.index.json "
                                 f"(only safetensors checkpoints are read)")
        from safetensors import safe_open
        self._handles: dict[Path, object] = {}
        self._where: dict[str, tuple[Path, str]] = {}  # normalised name -> (file, stored name)
        for f in dict.fromkeys(files.values()):
            if not f.exists():
                raise BasisError(f"{label}: shard {f} listed in the index does not exist")
            handle = self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
            for stored in handle.keys():
                self._where.setdefault(normalise(stored), (f, stored))

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        f, stored = self._where[name]
        return tuple(self._handles[f].get_slice(stored).get_shape())

    def get(self, name: str) -> torch.Tensor:
        f, stored = self._where[name]
        return self._handles[f].get_tensor(stored)

    def __contains__(self, name: str) -> bool:
        return name in self._where


def normalise(name: str) -> str:
    """`base_model.model.X.q_proj.base_layer.weight` -> `X.q_proj.weight` (PEFT-wrapped saves)."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    return name.replace(".base_layer.", ".")


def module_of(weight_name: str) -> str:
    return weight_name[: -len(".weight")]


def is_targeted(name: str, shape: tuple[int, ...], modules: list[str]) -> bool:
    """A 2-D `.weight` whose module path is one of `modules` or ends with `.<module>`
    (PEFT target_modules semantics); biases, norms and LoRA factors never match."""
    if len(shape) != 2 or not name.endswith(".weight"):
        return False
    path = module_of(name)
    return any(path == m or path.endswith("." + m) for m in modules)


# ---------------------------------------------------------------------------------------------
# Spectrum and truncation


FULL = "full"  # rank: keep every direction of V (its numerical rank)


def numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    cutoff = float(s[0]) * max(shape) * torch.finfo(torch.float32).eps
    return int((s > cutoff).sum())


def choose_k(energy: torch.Tensor, total: float, rank: int | None, tol: float | None) -> int:
    if rank is not None:
        return min(rank, energy.numel())
    # Dropped energy after keeping k = total - cumsum[k-1]; the smallest k with that <= tol*total.
    kept = torch.cumsum(energy.double(), 0)
    ok = (total - kept) <= tol * total * (1 + 1e-12)
    return int(torch.nonzero(ok)[0]) + 1 if bool(ok.any()) else energy.numel()


def _k_estimate(energy: torch.Tensor, total: float, tol: float) -> int:
    """A guess of k from q randomised leading energies, so that the next width is about right
    and a spectrum the randomised SVD cannot cut cheaply goes to the exact SVD at once: the decay
    over the leading three quarters (the last values of a randomised SVD come out low) continued
    geometrically, and never below the bound that every later value is at most the last used."""
    q = energy.numel()
    first, last = q // 4, 3 * q // 4 - 1
    e_last = float(energy[last])
    missing = total - float(energy[:last + 1].sum()) - tol * total
    if missing <= 0 or e_last <= 0:
        return last + 1
    bound = last + 1 + math.ceil(missing / e_last)
    ratio = (e_last / float(energy[first])) ** (1.0 / (last - first))
    if not 0.0 < ratio < 1.0 or tol <= 0:
        return bound
    # The energies past the last one, e_last * ratio^i (i >= 1), leave at most tol * total
    # from i > j on, where e_last * ratio^(j+1) / (1 - ratio) = tol * total.
    j = math.log(tol * total * (1 - ratio) / (e_last * ratio)) / math.log(ratio)
    return max(bound, last + 1 + math.ceil(max(j, 0.0)))


def truncated_svd(v: torch.Tensor, rank: int | None, tol: float | None = None,
                  total: float | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(U, S, complete): the full SVD, or for a large matrix the randomised one with
    oversampling (S then holds only the leading values). With a fixed rank the randomised SVD
    is taken once. With a tolerance it starts at LOWRANK_START columns and widens them (at least
    doubling, by _k_estimate) until the leading values hold all but `tol` of `total` =
    ||V||_F^2 (known exactly beforehand) with oversampling to spare; a spectrum too flat for
    that ends in the exact SVD."""
    small = min(v.shape)
    if small > LOWRANK_MIN_DIM:
        if rank is not None:
            q = rank + max(OVERSAMPLE, rank)
            if q < small // 2:
                u, s, _ = torch.svd_lowrank(v, q=q, niter=LOWRANK_ITERS)
                return u, s, False
        elif tol is not None and total is not None:
            q = LOWRANK_START
            # Wider than a quarter of the short side, the randomised SVD costs about the exact one.
            while q <= small // 4:
                u, s, _ = torch.svd_lowrank(v, q=q, niter=LOWRANK_ITERS)
                energy = s.double().pow(2)
                k = choose_k(energy, total, None, tol)
                # The captured share of these U_k is exactly the sum of their energies, so any
                # k found keeps 1 - tol; the oversampling keeps k close to the exact smallest.
                if k + max(OVERSAMPLE, k // 2) <= q:  # (k < q: the tolerance was reached inside)
                    return u, s, False
                q = max(2 * q, math.ceil(2.5 * _k_estimate(energy, total, tol)))
    u, s, _ = torch.linalg.svd(v, full_matrices=False)
    return u, s, True


@dataclass
class LayerBasis:
    name: str                     # module path, e.g. model.layers.0.self_attn.q_proj
    U: torch.Tensor               # d_out x k, orthonormal columns
    c: torch.Tensor               # k
    shape: tuple[int, int]        # (d_out, d_in) of the weight


def layer_basis(name: str, v: torch.Tensor, variant: str, rank: int | str | None,
                tol: float | None) -> tuple[LayerBasis, torch.Tensor, dict]:
    """rank "full": every direction of V's numerical rank (the AsFT reference's dense C = V V^T /
    ||V||_F, stored as U_k diag(c) U_k^T with k = rank(V), never as a d_out x d_out matrix)."""
    total = float(v.double().pow(2).sum())
    if total == 0.0:
        raise BasisError(f"{name}.weight: the aligned and base weights are identical (V = 0)")
    fro = math.sqrt(total)
    full = rank == FULL
    u, s, complete = truncated_svd(v, None if full else rank, None if full else tol, total)
    r = numerical_rank(s, v.shape) if complete else None
    energy = s.double().pow(2)
    k = r if full else choose_k(energy, total, rank, tol)
    if variant == "projector":
        # From a randomised SVD only the leading values are known; their numerical rank is a
        # lower bound of rank(V), and k < that bound suffices.
        known_rank = r if r is not None else numerical_rank(s, v.shape)
        if k >= known_rank:
            raise BasisError(f"{name}.weight: the projector variant needs k < rank(V) = {known_rank} (the "
                             f"projector onto all of V's column space anchors nothing), got k = {k}; "
                             f"lower --rank or raise --tol")
        c = torch.ones(k)
    else:
        c = (energy[:k] / fro).float()
    # The anchor's scale, for reading before training: safelora's c_i = sigma_i^2 / ||V||_F
    # shrinks with the alignment delta, and with c_max << 1 the penalty is about plain L2.
    info = {"shape": list(v.shape), "k": k, "rank": r,
            "captured_share": float(energy[:k].sum() / total), "fro_norm": fro,
            "c_max": float(c.max()), "c_median": float(c.median()), "c_sum": float(c.sum()),
            # the largest gap between the safelora penalty's weight (1 - c)^2 and L2's 1
            "l2_gap": float((2 * c - c * c).abs().max()),
            "spectrum_complete": complete}
    return LayerBasis(name, u[:, :k].contiguous().float(), c.contiguous(), tuple(v.shape)), s.float(), info


# ---------------------------------------------------------------------------------------------
# Extraction


def _matching_pairs(aligned: Checkpoint, base: Checkpoint, modules: list[str]) -> list[str]:
    """The targeted tensor names, in the aligned checkpoint's order; any missing or differently
    shaped counterpart fails here, before any SVD work, naming the first offender."""
    names = []
    for name in aligned.names():
        shape = aligned.shape(name)
        if not is_targeted(name, shape, modules):
            continue
        if name not in base:
            raise BasisError(f"tensor {name!r} of the aligned model is missing from the base model "
                             f"{base.label!r}")
        if base.shape(name) != shape:
            raise BasisError(f"tensor {name!r}: shape {list(shape)} in the aligned model but "
                             f"{list(base.shape(name))} in the base model (different architectures?)")
        names.append(name)
    for name in base.names():
        if is_targeted(name, base.shape(name), modules) and name not in aligned:
            raise BasisError(f"tensor {name!r} of the base model is missing from the aligned model "
                             f"{aligned.label!r}")
    if not names:
        sample = [n for n in aligned.names() if n.endswith(".weight")][:5]
        raise BasisError(f"no 2-D weight matches modules {modules}; weights look like {sample}")
    return names


class _ShardWriter:
    def __init__(self, out: Path):
        self.out, self.pending, self.size, self.files = out, {}, 0, []

    def add(self, tensors: dict[str, torch.Tensor]) -> str:
        self.pending.update(tensors)
        self.size += sum(t.numel() * t.element_size() for t in tensors.values())
        name = f"basis-{len(self.files) + 1:05d}.safetensors"
        if self.size >= SHARD_BYTES:
            self.flush()
        return name

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file
        name = f"basis-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.out / name))
        self.files.append(name)
        self.pending, self.size = {}, 0


def extract_basis(aligned: str, base: str, out: str | Path, modules=DEFAULT_MODULES,
                  variant: str = "safelora", rank: int | str | None = None, tol: float | None = None,
                  device: str | None = None, progress: bool = False) -> dict:
    """Write the basis of `aligned` relative to `base` to `out`; returns the manifest.
    With neither `rank` nor `tol`, tol = DEFAULT_TOL; rank "full" keeps rank(V) directions."""
    if variant not in VARIANTS:
        raise BasisError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if rank is not None and tol is not None:
        raise BasisError("give either rank or tol, not both")
    if rank == FULL and variant == "projector":
        raise BasisError(f"rank {FULL!r} with the projector variant: the projector onto all of V's column "
                         "space anchors nothing (it needs k < rank(V)); give --rank K or --tol T")
    if rank is not None and rank != FULL and (not isinstance(rank, int) or rank < 1):
        raise BasisError(f"rank must be an integer >= 1 or {FULL!r}, got {rank!r}")
    if rank is None:
        tol = DEFAULT_TOL if tol is None else tol
        if not 0.0 <= tol < 1.0:
            raise BasisError(f"tol must lie in [0, 1), got {tol}")
    modules = [m for m in (modules.split(",") if isinstance(modules, str) else modules) if m]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    a_ck = Checkpoint(resolve_model_dir(aligned), f"aligned {aligned!r}")
    b_ck = Checkpoint(resolve_model_dir(base), f"base {base!r}")
    names = _matching_pairs(a_ck, b_ck, modules)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out)
    layers = {}
    from safebasin.safety_core.progress import track
    for name in track(names, "align-basis", unit="layer", disable=not progress):
        # One pair of tensors at a time; the difference is formed in float32 on `device`.
        v = a_ck.get(name).to(device, torch.float32) - b_ck.get(name).to(device, torch.float32)
        lb, spectrum, info = layer_basis(module_of(name), v, variant, rank, tol)
        del v
        info["file"] = writer.add({f"{lb.name}.U": lb.U.cpu(), f"{lb.name}.c": lb.c.cpu(),
                                   f"{lb.name}.S": spectrum.cpu()})
        layers[lb.name] = info
    writer.flush()
    manifest = {"format": FORMAT, "variant": variant, "aligned": aligned, "base": base,
                "modules": modules, "selection": {"rank": rank, "tol": tol},
                "tol_definition": TOL_HELP, "files": writer.files, "layers": layers}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


# ---------------------------------------------------------------------------------------------
# Loading


class Basis:
    """A basis folder: the manifest at once, each layer's tensors read on first use."""

    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = root, manifest
        self._handles: dict[str, object] = {}
        self._cache: dict[str, LayerBasis] = {}

    @property
    def variant(self) -> str:
        return self.manifest["variant"]

    @property
    def names(self) -> list[str]:
        return list(self.manifest["layers"])

    def match(self, module_path: str) -> str | None:
        """The basis layer for a model's module path, tolerant of wrapper prefixes: an exact
        match after normalisation, else the unique basis name that is a dotted suffix of it
        (or of which it is one)."""
        path = module_of(normalise(module_path + ".weight"))
        if path in self.manifest["layers"]:
            return path
        hits = [n for n in self.names if path.endswith("." + n) or n.endswith("." + path)]
        return hits[0] if len(hits) == 1 else None

    def layer(self, name: str) -> LayerBasis:
        if name not in self._cache:
            from safetensors import safe_open
            info = self.manifest["layers"][name]
            if info["file"] not in self._handles:
                self._handles[info["file"]] = safe_open(str(self.root / info["file"]), framework="pt",
                                                        device="cpu")
            h = self._handles[info["file"]]
            self._cache[name] = LayerBasis(name, h.get_tensor(f"{name}.U"), h.get_tensor(f"{name}.c"),
                                           tuple(info["shape"]))
        return self._cache[name]

    def spectrum(self, name: str) -> torch.Tensor:
        self.layer(name)
        return self._handles[self.manifest["layers"][name]["file"]].get_tensor(f"{name}.S")


def load_basis(path: str | Path) -> Basis:
    """Open a basis folder written by extract_basis."""
    root = Path(path)
    if not (root / MANIFEST).exists():
        raise BasisError(f"{root}: no {MANIFEST}; write one with `safebasin align-basis`")
    manifest = json.loads((root / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise BasisError(f"{root / MANIFEST}: unknown format {manifest.get('format')!r}")
    return Basis(root, manifest)
