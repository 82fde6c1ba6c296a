"""Loss landscapes, structural difference of surfaces, safety landscapes and basin widths."""

import math
import os

import numpy as np
import pytest
import torch
from safebasin.safety_core.measure.basin import (
    SafetyLandscapeArgs,
    basin_width,
    safety_landscape,
)
from safebasin.safety_core.measure.correlation import example_nll, mean_nll
from safebasin.safety_core.measure.directions import (
    delta_direction,
    gradient_direction,
    random_direction,
    select_parameters,
)
from safebasin.safety_core.measure.surfaces import (
    LandscapeArgs,
    laplacian,
    loss_landscape,
    read_surface_csv,
    structural_difference,
)
from safebasin.safety_core.train.data import DataSource, load_conversations

TASK = {"path": "builtin:task-eval", "limit": 6}


@pytest.fixture
def model_tok(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model, before) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # bit-exact


def test_loss_landscape_center_is_model_loss_and_parameters_restored(model_tok, tmp_path):
    model, tok = model_tok
    args = LandscapeArgs(data=DataSource(**TASK), params=["layers.1."], grid_size=3, span=0.5,
                         batch_size=4, max_length=64)
    convs = load_conversations(args.data)
    own_loss = mean_nll(example_nll(model, tok, convs, max_length=64, progress=False))
    before = snapshot(model)
    res = loss_landscape(model, tok, args, tmp_path)
    assert_unchanged(model, before)
    z = np.array(res["loss"])
    assert z.shape == (3, 3) and res["alphas"] == [-0.5, 0.0, 0.5]
    assert z[1, 1] == pytest.approx(own_loss, rel=1e-6) and res["center_loss"] == pytest.approx(own_loss, rel=1e-6)
    assert res["params"] and all("layers.1." in n for n in res["params"])
    assert len({float(v) for v in z.ravel()}) > 1  # the sweep moved the loss
    # Along the gradient direction the loss rises: the descent side is lower than the ascent side.
    assert z[0, 1] < z[2, 1]
    alphas, betas, z_csv = read_surface_csv(res["files"]["csv"])
    assert alphas == res["alphas"] and np.array_equal(z_csv, z)
    assert os.path.getsize(res["files"]["png"]) > 0


def test_directions_are_scaled_per_tensor_and_orthogonal(model_tok):
    model, tok = model_tok
    params = select_parameters(model, ["self_attn"])
    convs = load_conversations(DataSource(**TASK))
    before = snapshot(model)
    d1 = gradient_direction(model, tok, convs, params, batch_size=4, max_length=64)
    assert_unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())  # no stray .grad left behind
    d2 = random_direction(params, seed=1, orthogonal_to=d1)
    assert set(d1) == set(d2) == set(params)
    for n, p in params.items():
        assert d1[n].norm().item() == pytest.approx(p.norm().item(), rel=1e-5)
        assert d2[n].norm().item() == pytest.approx(p.norm().item(), rel=1e-5)
        assert abs(float((d1[n] * d2[n]).sum())) < 1e-4 * p.norm().item() ** 2
    again = random_direction(params, seed=1, orthogonal_to=d1)
    assert all(torch.equal(d2[n], again[n]) for n in d2)
    with pytest.raises(ValueError, match="no parameters matching"):
        select_parameters(model, ["no_such_layer"])


def surfaces():
    a, b = np.meshgrid(np.linspace(-1, 1, 9), np.linspace(-1, 1, 9), indexing="ij")
    return a, b


def test_structural_difference():
    a, b = surfaces()
    bowl_with_ridges = np.sin(3 * a) * np.cos(2 * b) + a ** 3
    other = a ** 2 * b + np.cos(4 * a * b)
    assert structural_difference(bowl_with_ridges, bowl_with_ridges) == 0.0
    assert structural_difference(bowl_with_ridges, bowl_with_ridges + 7.5) == pytest.approx(0.0, abs=1e-9)
    # A plane added (a tilt) has no curvature either.
    assert structural_difference(bowl_with_ridges, bowl_with_ridges + 2 * a - b) == pytest.approx(0.0, abs=1e-9)
    diff = structural_difference(bowl_with_ridges, other)
    assert 0.0 < diff <= 200.0 and diff > 1.0
    assert structural_difference(bowl_with_ridges, -bowl_with_ridges) == pytest.approx(200.0)
    paraboloid = a ** 2 + b ** 2  # constant Laplacian
    assert structural_difference(paraboloid, paraboloid + 1) == 0.0
    assert math.isnan(structural_difference(paraboloid, other))
    assert laplacian(paraboloid).shape == (7, 7)
    assert np.allclose(laplacian(paraboloid), 4 * (2 / 8) ** 2)


def test_basin_width():
    alphas = [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]
    # 1.0 is under the threshold again but not contiguous with 0; 0.2 at the threshold counts as safe.
    assert basin_width(alphas, [0.9, 0.2, 0.1, 0.0, 0.05, 0.3, 0.1], 0.2) == \
        {"width": 0.5, "left": -0.5, "right": 0.25, "center_safe": True}
    assert basin_width(alphas, [0.0] * 7, 0.2)["width"] == 1.0
    assert basin_width(alphas, [0, 0, 0, 0.5, 0, 0, 0], 0.2)["width"] == 0.0
    # Loss metric: safe while the harmful-response loss stays high.
    assert basin_width(alphas, [1, 2, 3, 4, 3, 2, 1], 2.5, safe="above")["width"] == 0.25
    assert basin_width(alphas, [0, None, 0, 0, 0, 0, 0], 0.2)["left"] == -0.25


def test_safety_landscape_along_delta_and_random_directions(model_tok, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    model, tok = model_tok
    tuned = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if "layers.0.mlp" in n:
                p.add_(torch.randn_like(p) * 0.5 * p.std())
    names = [n for n, _ in model.named_parameters() if "layers.0.mlp" in n]
    delta = delta_direction(model.state_dict(), tuned.state_dict(), names)
    harmful = DataSource(path="builtin:harmful-heldout", limit=4)
    convs = load_conversations(harmful)
    target_loss = mean_nll(example_nll(tuned, tok, convs, max_length=96, progress=False))
    own_loss = mean_nll(example_nll(model, tok, convs, max_length=96, progress=False))

    before = snapshot(model)
    args = SafetyLandscapeArgs(harmful=harmful, metric="loss", alphas=[-1, 1], params=names,
                               random_directions=1, max_length=96, batch_size=4, tolerance=100.0)
    res = safety_landscape(model, tok, {"ft_delta": delta}, args, tmp_path)
    assert_unchanged(model, before)
    assert res["alphas"] == [-1.0, 0.0, 1.0] and set(res["curves"]) == {"ft_delta", "random0"}
    # a = 1 along the fine-tuning delta is the fine-tuned model; a = 0 the model itself.
    assert res["curves"]["ft_delta"][2] == pytest.approx(target_loss, rel=1e-5)
    assert res["curves"]["ft_delta"][1] == res["curves"]["random0"][1] == pytest.approx(own_loss, rel=1e-6)
    assert res["safe"] == "above" and res["threshold"] == pytest.approx(own_loss - 100.0)
    assert res["basin"]["ft_delta"]["width"] == 1.0  # loose threshold: everything is inside
    assert os.path.getsize(res["files"]["png"]) > 0
    rows = open(res["files"]["csv"]).read().splitlines()
    assert rows[0] == "direction,alpha,value,unparsed,degenerate" and len(rows) == 1 + 2 * 3

    hrr_args = SafetyLandscapeArgs(harmful=harmful, metric="hrr", alphas=[-0.5, 0.5], max_new_tokens=6,
                                   batch_size=4, threshold=0.5)
    hrr = safety_landscape(model, tok, {"ft_delta": delta}, hrr_args)
    assert_unchanged(model, before)
    assert hrr["judge"] == "keyword" and hrr["safe"] == "below"
    assert all(v is not None and 0.0 <= v <= 1.0 for v in hrr["curves"]["ft_delta"])
    # The empty or looping answers are their own curve, never folded into HRR's safe side.
    assert all(g is not None and v + g <= 1.0 + 1e-9
               for v, g in zip(hrr["curves"]["ft_delta"], hrr["degenerate"]["ft_delta"]))


def test_delta_direction_checks(model_tok):
    model, _ = model_tok
    state = model.state_dict()
    with pytest.raises(KeyError, match="missing"):
        delta_direction(state, {}, ["model.norm.weight"])
    zero = delta_direction(state, state)
    assert all(float(t.abs().max()) == 0.0 for t in zero.values())


def test_lora_landscape_perturbs_only_the_adapter(model_tok):
    from peft import LoraConfig, get_peft_model
    model, tok = model_tok
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a trained adapter: B is no longer zero, so it has a scale to move by
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    before = snapshot(model)
    res = loss_landscape(model, tok, LandscapeArgs(data=DataSource(**TASK), grid_size=3, batch_size=6, max_length=64))
    assert_unchanged(model, before)
    assert res["params"] and all("lora_" in n for n in res["params"])  # default: the trainable ones
    z = np.array(res["loss"])
    assert z[1, 1] == pytest.approx(res["center_loss"], rel=1e-6) and np.ptp(z) > 0
