"""Safe LoRA (Hsu et al., 2024), the post-hoc baseline: per adapted layer, project the LoRA
update onto the alignment anchor, B' = C B with C = U diag(c) U^T, and keep the projection
for the layers whose update it changes most (lowest cosine between C B A and B A).

Everything is computed from r x r Gram matrices and U^T B (k x r): neither C (d_out x d_out)
nor a d_out x d_in update is ever formed. The input adapter folder is only read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safebasin.safety_core.anchor.basis import BasisError, load_basis

ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT = "safe_lora_report.json"
DEFAULT_THRESHOLD = 0.5


def apply_anchor(U: torch.Tensor, c: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """C Y = U (c * (U^T Y)) without materialising C."""
    return U @ (c[:, None] * (U.T @ Y))


def update_cosine(B: torch.Tensor, A: torch.Tensor, CB: torch.Tensor) -> float:
    """Frobenius cosine between (C B) A and B A, via <X A, Y A> = sum((X^T Y) * (A A^T))."""
    gram_a = A @ A.T
    inner = float(((CB.T @ B) * gram_a).sum())
    norm_p = float(((CB.T @ CB) * gram_a).sum()) ** 0.5
    norm_o = float(((B.T @ B) * gram_a).sum()) ** 0.5
    if norm_p == 0.0 or norm_o == 0.0:
        return 0.0  # an update with nothing inside the anchor is as unaligned as it gets
    return inner / (norm_p * norm_o)


def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """module path -> (lora_A key, lora_B key) for every linear LoRA pair of an adapter file."""
    pairs = {}
    for key in state:
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key not in state:
                raise BasisError(f"adapter tensor {key!r} has no matching {b_key!r}")
            pairs[module] = (key, b_key)
    return pairs


def project_adapter(adapter: str | Path, basis: str | Path, out: str | Path, *,
                    threshold: float | None = None, num_layers: int | None = None) -> dict:
    """Write the projected adapter to `out` (every other file of the adapter copied as is)
    and return the report, also written to out/safe_lora_report.json."""
    from safetensors.torch import load_file, save_file
    if threshold is not None and num_layers is not None:
        raise BasisError("give either threshold or num_layers, not both")
    if threshold is None and num_layers is None:
        threshold = DEFAULT_THRESHOLD
    adapter, out = Path(adapter), Path(out)
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.exists():
        raise BasisError(f"{adapter}: no {ADAPTER_WEIGHTS} (only safetensors adapters are read)")
    if out.resolve() == adapter.resolve():
        raise BasisError(f"--out {out} is the input adapter; the input is never modified")
    state = load_file(str(weights))
    pairs = lora_pairs(state)
    if not pairs:
        raise BasisError(f"{weights}: no lora_A/lora_B tensors")
    anchor = load_basis(basis)

    layers, projected_b = {}, {}
    for module, (a_key, b_key) in pairs.items():
        name = anchor.match(module)
        if name is None:
            raise BasisError(f"adapted layer {module!r} has no layer in the basis {basis} "
                             f"(basis layers look like {anchor.names[:3]})")
        lb = anchor.layer(name)
        A, B = state[a_key].double(), state[b_key].double()
        if B.shape[0] != lb.shape[0] or A.shape[1] != lb.shape[1]:
            raise BasisError(f"adapted layer {module!r}: update shape ({B.shape[0]}, {A.shape[1]}) "
                             f"but the basis layer {name!r} has {list(lb.shape)}")
        CB = apply_anchor(lb.U.double(), lb.c.double(), B)
        layers[module] = {"basis_layer": name, "cosine": update_cosine(B, A, CB)}
        projected_b[module] = CB.to(state[b_key].dtype)

    order = sorted(layers, key=lambda m: layers[m]["cosine"])
    chosen = set(order[:num_layers]) if num_layers is not None else \
        {m for m in order if layers[m]["cosine"] <= threshold}
    new_state = dict(state)
    for module in chosen:
        new_state[pairs[module][1]] = projected_b[module].contiguous()
    for module, row in layers.items():
        row["projected"] = module in chosen

    out.mkdir(parents=True, exist_ok=True)
    for f in adapter.iterdir():
        if f.is_file() and f.name not in (ADAPTER_WEIGHTS, REPORT):
            shutil.copy2(f, out / f.name)
    save_file(new_state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    report = {"adapter": str(adapter), "basis": str(basis), "variant": anchor.variant,
              "rule": {"threshold": threshold} if num_layers is None else {"num_layers": num_layers},
              "num_projected": len(chosen), "num_layers": len(layers), "layers": layers}
    (out / REPORT).write_text(json.dumps(report, indent=2))
    return report
