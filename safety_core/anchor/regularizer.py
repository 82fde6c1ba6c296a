"""Safety anchoring (AsFT): fine-tune while penalising the part of each adapted layer's update
that leaves the alignment anchor C = U diag(c) U^T,

    loss = task_loss + lambda * sum_layers ||(I - C) DeltaW||_F^2,

or one of its controls (`anchor.variant`, see anchor/variants.py): `l2` (C = 0, no basis) and
`aligned` (||C DeltaW||_F^2, the part inside the alignment span).

DeltaW = B A for LoRA (times alpha/r only with include_lora_scaling) and W - W0 for full
parameters. For full parameters W and W0 are the optimizer's fp32 values at every ZeRO stage (in
bf16/fp16 training the module's half-precision weights round away updates smaller than their
last bit, so DeltaW taken from them would differ from the fp32 masters ZeRO-3 reads); W0 is
kept like the parameters: whole on every rank under ZeRO 0-2, this rank's fragment under
ZeRO-3. Where the trainable parameters are whole on every rank (ZeRO 0-2) the penalty goes
through autograd; under ZeRO-3 they are partitioned, so its gradient is added to each rank's
gradient partition after the last backward of the step and before clipping and the optimizer
step, through DeepSpeed's tensor-fragment API.

(Just over 300 lines: the autograd path and the ZeRO-3 path of the same penalty stay side by
side so that they are read, and changed, together.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from pydantic import Field, model_validator
from safebasin.safety_core import zero3
from safebasin.safety_core.anchor import variants
from safebasin.safety_core.anchor.basis import MANIFEST, BasisError, load_basis
from safebasin.safety_core.anchor.variants import AnchorScaleWarning  # noqa: F401  (re-exported)
from safebasin.safety_core.args import Section
from safebasin.safety_core.precision import fp32_value
from safebasin.safety_core.train.ds_config import zero_stage


class AnchorArgs(Section):
    basis: str | None = Field(None, description="a folder written by `safebasin align-basis` (required "
                              "except for variant l2, where it only adds the outside-share metric)")
    variant: str | None = Field(None, pattern="^(" + "|".join(variants.VARIANTS) + ")$",
                                description="safelora, safelora-normalized, projector (anchors), "
                                "random-subspace, aligned, l2 (controls); default: the basis's own variant")
    lam: float = Field(1.0, alias="lambda", ge=0.0, description="weight of the anchor penalty")
    include_lora_scaling: bool = Field(False, description="LoRA: penalise (alpha/r) B A instead "
                                       "of B A (off, as in the AsFT reference code, so its lambda "
                                       "values transfer)")

    @model_validator(mode="after")
    def _basis_unless_l2(self):
        if self.basis is None and self.variant != "l2":
            raise ValueError("anchor.basis is required (only anchor.variant: l2 runs without a basis)")
        return self

    def basis_problem(self) -> str | None:
        """Why `basis` cannot be used with `variant`, or None; for failing before any rank starts.
        (Not a field validator: example configs name a basis made in a step before training.)"""
        if self.basis is None:
            return None
        from pathlib import Path
        if not (Path(self.basis) / MANIFEST).exists():
            return f"{self.basis!r} holds no {MANIFEST}; write a basis with `safebasin align-basis`"
        basis_variant = load_basis(self.basis).variant
        return variants.compatibility_problem(self.variant or basis_variant, basis_variant)


@dataclass
class _Layer:
    name: str                 # module path in the model
    U: torch.Tensor           # d_out x k on the parameter's device, float32 (k = 0 without a basis)
    c: torch.Tensor           # the variant's penalty weights: k, or 0 for l2 (C = 0)

    @property
    def penalty_U(self) -> torch.Tensor:
        """The columns of U the penalty uses: none for l2 (its U serves only the outside metric)."""
        return self.U[:, :self.c.numel()]


@dataclass
class _LoraLayer(_Layer):
    A: torch.nn.Parameter
    B: torch.nn.Parameter
    scale: float


@dataclass
class _LoraGroup:
    """Adapted layers of one shape, whose anchors are stacked once so that each step takes their
    penalty in one batched call (a few launches for all of them, not a few dozen per layer)."""
    index: list[int]          # positions in the regularizer's layers
    U: torch.Tensor           # L x d_out x k
    c: torch.Tensor           # L x (penalty columns)
    scale: torch.Tensor       # L x 1 x 1: each layer's factor on B A


def _lora_groups(layers: list[_LoraLayer]) -> list[_LoraGroup]:
    by_shape: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        key = (zero3.full_shape(layer.B), zero3.full_shape(layer.A), layer.U.shape[1], layer.c.numel(),
               str(layer.U.device))
        by_shape.setdefault(key, []).append(i)
    groups = []
    for index in by_shape.values():
        U = torch.stack([layers[i].U for i in index])
        c = torch.stack([layers[i].c for i in index])
        for j, i in enumerate(index):  # each layer keeps views into the stack: one copy of every U
            layers[i].U, layers[i].c = U[j], c[j]
        scale = torch.tensor([layers[i].scale for i in index], device=U.device).view(-1, 1, 1)
        groups.append(_LoraGroup(index, U, c, scale))
    return groups


@dataclass
class _FullLayer(_Layer):
    W: torch.nn.Parameter
    W0: torch.Tensor          # fp32; ZeRO 0-2: the whole initial weight; ZeRO-3: this rank's fragment
    start: int = 0            # ZeRO-3: first flat index of this rank's fragment in W
    shape: tuple = ()


def anchor_factory(args: AnchorArgs):
    """The trainer's regularizer_factory(model, ds_config) for this config section."""
    def factory(model, ds_config):
        return [AnchorRegularizer(args, model, ds_config)]
    return factory


def _lora_modules(model):
    from peft.tuners.lora import LoraLayer
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter in module.lora_A and module.lora_A[adapter].weight.requires_grad:
                yield path, module.lora_A[adapter].weight, module.lora_B[adapter].weight, \
                    module.scaling[adapter]


class AnchorRegularizer:
    """The trainer's Regularizer for the anchor penalty (see module docstring).

    Metrics per step, measured at the parameters the step's gradient is taken at:
    `anchor_penalty` = sum over layers of ||(I - C) DeltaW||^2 (before lambda), and
    `anchor_outside_share` = sum ||(I - U_k U_k^T) DeltaW||^2 / sum ||DeltaW||^2, the share of
    the update's energy outside span(U_k) (None while DeltaW = 0). Both energies come with the
    penalty: for full parameters from its one pass over W, W0 and U (under ZeRO-3 from its one
    reduction); for LoRA from its small factors, with same-shape layers stacked into one
    batched call per group.
    """

    def __init__(self, args: AnchorArgs, model, ds_config: dict):
        self.lam = float(args.lam)
        self.stage = zero_stage(ds_config)
        self.grad_accum = int(ds_config.get("gradient_accumulation_steps", 1))
        self.basis = load_basis(args.basis) if args.basis is not None else None
        basis_variant = self.basis.variant if self.basis is not None else None
        self.variant = args.variant or basis_variant
        problem = variants.compatibility_problem(self.variant, basis_variant)
        if problem:
            raise BasisError(f"anchor: {problem}")
        self.region = variants.region(self.variant)
        self._micro = 0
        self._pending: dict[str, torch.Tensor] = {}
        self.coverage: float | None = None  # full parameters: share of trainable parameters anchored
        self._coverage_pending = False
        lora = list(_lora_modules(model))
        self.method = "lora" if lora else "full"
        if lora:
            self.layers = [self._lora_layer(path, A, B, s if args.include_lora_scaling else 1.0)
                           for path, A, B, s in lora]
            self.groups = _lora_groups(self.layers)
        else:
            self.layers = self._full_layers(model)
            if not self.layers:
                raise BasisError(f"no trainable 2-D weight of the model has a layer in the basis "
                                 f"{args.basis} (basis layers look like {self.basis.names[:3]})")
            self.coverage = variants.announce_coverage(model, [layer.shape for layer in self.layers])
            self._coverage_pending = True
        # Named as the basis names its layers (the manifest's keys), the model's path without one.
        names = [(self.basis.match(layer.name) if self.basis is not None else None) or layer.name
                 for layer in self.layers]
        cs = [layer.c for layer in self.layers]
        # The anchor's strength per layer, printed now and logged with the first step.
        self.strengths = variants.layer_strengths(names, cs)
        self._strength_pending = True
        if not dist.is_initialized() or dist.get_rank() == 0:
            variants.announce(self.variant, self.lam, cs, [layer.U.shape[0] for layer in self.layers], names)

    # -- construction ---------------------------------------------------------------------

    def _anchor_of(self, path: str, d_out: int, d_in: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.basis is None:  # l2 without a basis: C = 0
            empty = torch.zeros(d_out, 0, device=device)
            return empty, empty[0]
        name = self.basis.match(path)
        if name is None:
            raise BasisError(f"adapted layer {path!r} has no layer in the basis {self.basis.root} "
                             f"(basis layers look like {self.basis.names[:3]}); extract the basis "
                             f"with --modules covering every trained module")
        lb = self.basis.layer(name)
        if tuple(lb.shape) != (d_out, d_in):
            raise BasisError(f"layer {path!r} has shape ({d_out}, {d_in}) but its basis layer "
                             f"{name!r} has {list(lb.shape)}")
        if self.variant == "projector" and lb.U.shape[1] >= d_out:
            raise BasisError(f"anchor.variant projector: basis layer {name!r} keeps all {d_out} output "
                             f"directions, so I - U U^T = 0 anchors nothing; extract the basis with a "
                             f"smaller --rank")
        return (variants.directions(self.variant, name, lb.U.to(device, torch.float32)),
                variants.weights(self.variant, lb.c.to(device, torch.float32)))

    def _lora_layer(self, path, A, B, scale) -> _LoraLayer:
        (_, d_in), (d_out, _) = zero3.full_shape(A), zero3.full_shape(B)
        U, c = self._anchor_of(path, d_out, d_in, A.device)
        return _LoraLayer(path, U, c, A=A, B=B, scale=float(scale))

    def _full_layers(self, model) -> list[_FullLayer]:
        layers = []
        for pname, W in model.named_parameters():
            shape = zero3.full_shape(W)
            if not W.requires_grad or len(shape) != 2 or not pname.endswith(".weight"):
                continue
            path = pname[: -len(".weight")]
            if self.basis is not None and self.basis.match(path) is None:
                continue  # trained freely: the basis names the anchored layers (without one, l2 takes all)
            U, c = self._anchor_of(path, *shape, W.device)
            if self.stage == 3:
                # Captured before any checkpoint is loaded: the initial weights, also on resume.
                start = zero3.partition(W).start
                W0 = zero3.local_fp32(W, U.device).clone()
            else:
                start, W0 = 0, fp32_value(W).detach().clone()
            layers.append(_FullLayer(path, U, c, W=W, W0=W0, start=start, shape=shape))
        return layers

    # -- Regularizer protocol -------------------------------------------------------------

    def loss(self, model) -> torch.Tensor | None:
        if self.stage == 3:
            return None
        self._micro += 1
        if self._micro > 1:
            return None
        # DeepSpeed divides every micro-batch loss by the accumulation steps, so adding
        # grad_accum * lambda * P to one micro-batch puts lambda * dP/dtheta in the step's
        # gradient once, without recomputing P on every micro-batch.
        penalty, outside, energy = self._autograd_terms()
        self._pending = {"penalty": penalty.detach(), "outside": outside, "energy": energy}
        return (self.grad_accum * self.lam) * penalty

    def before_step(self, engine) -> dict[str, float]:
        self._micro = 0
        if self.stage == 3:
            scale = float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0)
            if self.method == "lora":
                penalty, outside, energy = self._zero3_lora(scale)
            else:
                penalty, outside, energy = self._zero3_full(scale)
        else:
            penalty, outside, energy = (self._pending[k] for k in ("penalty", "outside", "energy"))
        penalty, outside, energy = float(penalty), float(outside), float(energy)
        # Without a basis there is no span to be outside of.
        share = outside / energy if energy > 0 and self.basis is not None else None
        metrics = {"anchor_penalty": penalty, "anchor_outside_share": share}
        if self._coverage_pending:
            metrics["anchor_coverage"] = self.coverage
            self._coverage_pending = False
        if self._strength_pending:
            metrics.update(variants.strength_summary(self.strengths))
            self._strength_pending = False
        return metrics

    # -- replicated parameters: autograd ------------------------------------------------------

    def _autograd_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(penalty with its graph, outside energy, update energy), summed over layers."""
        from safebasin.kernels import anchor_penalty_full_metrics
        if self.method == "lora":
            return self._lora_terms([layer.A for layer in self.layers], [layer.B for layer in self.layers])
        total, outside, energy = 0.0, 0.0, 0.0
        for layer in self.layers:
            # Penalty, outside share and energy from one read of W, W0 and U.
            p, out, e = anchor_penalty_full_metrics(fp32_value(layer.W), layer.W0, layer.U, layer.c, self.region)
            # Tensors summed, not floats: no device sync per layer on the forward path.
            total, outside, energy = total + p, outside + out, energy + e
        return total, outside, energy

    def _lora_terms(self, As: list[torch.Tensor], Bs: list[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same three sums for LoRA factors (the parameters, or ZeRO-3's gathered copies):
        one batched penalty call per group of same-shape layers."""
        from safebasin.kernels import anchor_penalty_metrics
        total, outside, energy = 0.0, 0.0, 0.0
        for g in self.groups:
            B = torch.stack([Bs[i] for i in g.index]).float() * g.scale
            A = torch.stack([As[i] for i in g.index]).float()
            p, out, e = anchor_penalty_metrics(B, A, g.U, g.c, self.region)
            total, outside, energy = total + p, outside + out, energy + e
        return total, outside, energy

    # -- ZeRO-3: gradient partitions ------------------------------------------------------

    def _zero3_full(self, loss_scale: float):
        """The exact sharded penalty without gathering a parameter: each rank forms its share of
        every layer's U^T DeltaW and ||DeltaW||^2, one all-reduce per process group sums all
        anchored layers' shares at once (k x d_in + 1 floats per layer), and each rank then forms
        the gradient of the elements it holds. The outside-span metric and the update energy
        come from the same reduction."""
        from safebasin.kernels.anchor_ops import sharded_partials, sharded_penalty_from
        # With optimizer offload the fp32 partition and its gradient live on the CPU; the
        # collectives run on the anchor's (the parameter's) device.
        local = [zero3.local_fp32(layer.W, layer.U.device) for layer in self.layers]
        partials = [sharded_partials(w, layer.W0, layer.start, layer.shape, layer.U)
                    for w, layer in zip(local, self.layers)]
        reduced = zero3.all_reduce_bucketed(partials, [zero3.partition(layer.W).group for layer in self.layers])
        total, outside, energy = 0.0, 0.0, 0.0
        for layer, w, r in zip(self.layers, local, reduced):
            penalty, out, sq, g = sharded_penalty_from(r, w, layer.W0, layer.start, layer.shape, layer.U,
                                                       layer.c, self.region)
            zero3.add_to_local_grad(layer.W, g, self.lam * loss_scale)
            total, outside, energy = total + penalty, outside + out, energy + sq
        return total, outside, energy

    def _zero3_lora(self, loss_scale: float):
        """LoRA factors are small: gather every layer's fp32 A and B with one all-gather, take
        the penalty and its gradient by autograd on those copies (identical on every rank), and
        add each rank's slice of the gradient to its gradient partition."""
        params = [p for layer in self.layers for p in (layer.A, layer.B)]
        parts = [zero3.partition(p) for p in params]
        group, world = parts[0].group, parts[0].world
        device = self.layers[0].U.device  # the collective's device (offloaded partitions sit on the CPU)
        # Padded to the partition size, so every rank contributes pieces of equal length.
        local = torch.cat([torch.nn.functional.pad(zero3.local_fp32(p, device), (0, part.size - part.valid))
                           for p, part in zip(params, parts)])
        pieces = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(pieces, local, group=group)
        gathered = torch.stack(pieces)             # world x sum(partition sizes)
        full, offset = [], 0
        for p, part in zip(params, parts):
            shape = zero3.full_shape(p)
            flat = gathered[:, offset:offset + part.size].reshape(-1)[: shape[0] * shape[1]]
            full.append(flat.view(shape).clone().requires_grad_(True))
            offset += part.size
        total, outside, energy = self._lora_terms(full[0::2], full[1::2])
        grads = torch.autograd.grad(total, full)
        for p, part, g in zip(params, parts, grads):
            mine = g.flatten()[part.start:part.start + part.valid]
            zero3.add_to_local_grad(p, mine, self.lam * loss_scale)
        return total.detach(), outside, energy
