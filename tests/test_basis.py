"""Alignment basis extraction: equals an SVD of W_aligned - W_base, streams sharded and
PEFT-named checkpoints, and names the offending tensor when the models do not match."""

import json

import pytest
import torch
from safebasin.safety_core.anchor.basis import BasisError, extract_basis, load_basis
from safetensors.torch import load_file, save_file

Q0 = "model.layers.0.self_attn.q_proj"


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def dense_anchor(v: torch.Tensor, k: int, variant: str) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(v.double(), full_matrices=False)
    c = s[:k] ** 2 / v.double().norm() if variant == "safelora" else torch.ones(k, dtype=torch.float64)
    return u[:, :k] @ torch.diag(c) @ u[:, :k].T


@pytest.mark.parametrize("variant", ["safelora", "projector"])
def test_basis_is_the_svd_of_the_difference(tmp_path, aligned_pair, variant):
    base, aligned = aligned_pair
    manifest = extract_basis(str(aligned), str(base), tmp_path / "b", modules="q_proj,v_proj,up_proj",
                             variant=variant, rank=5)
    a, b = weights(aligned), weights(base)
    expected = {f"model.layers.{i}.{m}" for i in range(2)
                for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")}
    assert set(manifest["layers"]) == expected
    basis = load_basis(tmp_path / "b")
    for name in expected:
        v = a[name + ".weight"] - b[name + ".weight"]
        layer = basis.layer(name)
        assert layer.U.shape == (v.shape[0], 5) and layer.shape == tuple(v.shape)
        torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(5), atol=1e-5, rtol=0)
        got = layer.U.double() @ torch.diag(layer.c.double()) @ layer.U.double().T
        # A float32 SVD against a float64 one: the top-5 subspace moves by about eps * sigma_1 / gap,
        # observed up to 2.2e-5 of the anchor's scale (175 x 64 up_proj); a wrong basis is O(1) off.
        torch.testing.assert_close(got, dense_anchor(v, 5, variant), atol=1e-4 * got.abs().max().item(), rtol=0)
        info = manifest["layers"][name]
        s = torch.linalg.svdvals(v.double())
        assert info["k"] == 5 and info["rank"] == min(v.shape)
        assert info["captured_share"] == pytest.approx(float((s[:5] ** 2).sum() / (s ** 2).sum()), rel=1e-4)
        torch.testing.assert_close(basis.spectrum(name).double(), s, rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["variant"] == variant


def test_tol_picks_the_smallest_k_within_the_dropped_energy(tmp_path, aligned_pair):
    base, aligned = aligned_pair
    manifest = extract_basis(str(aligned), str(base), tmp_path / "b", modules=["v_proj"], tol=0.3)
    a, b = weights(aligned), weights(base)
    for name, info in manifest["layers"].items():
        s2 = torch.linalg.svdvals((a[name + ".weight"] - b[name + ".weight"]).double()) ** 2
        dropped = 1 - torch.cumsum(s2, 0) / s2.sum()   # dropped share after keeping k = 1, 2, ...
        k = info["k"]
        assert dropped[k - 1] <= 0.3 < dropped[k - 2]
        assert info["captured_share"] >= 0.7


def test_tol_on_a_large_layer_takes_the_randomised_svd_when_the_spectrum_decays():
    """Above LOWRANK_MIN_DIM a --tol extraction need not pay for the exact SVD: a decaying
    spectrum is cut from a randomised one (same k, same subspace, at least 1 - tol kept); a flat
    one falls back to the exact SVD."""
    from safebasin.safety_core.anchor.basis import LOWRANK_MIN_DIM, layer_basis
    gen = torch.Generator().manual_seed(0)
    d_out, d_in = LOWRANK_MIN_DIM + 76, LOWRANK_MIN_DIM + 16
    left, _ = torch.linalg.qr(torch.randn(d_out, d_in, generator=gen))
    right, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen))
    decaying = left @ torch.diag(0.9 ** torch.arange(d_in, dtype=torch.float32)) @ right.T
    flat = torch.randn(d_out, d_in, generator=gen)
    for v, randomised in ((decaying, True), (flat, False)):
        layer, _, info = layer_basis("layer", v, "safelora", None, 0.01)
        assert info["spectrum_complete"] is not randomised
        s2 = torch.linalg.svdvals(v.double()) ** 2
        exact_k = int(torch.nonzero(1 - torch.cumsum(s2, 0) / s2.sum() <= 0.01)[0]) + 1
        assert info["k"] == exact_k
        kept = float((layer.U.double().T @ v.double()).pow(2).sum() / s2.sum())
        assert kept >= 0.99 and kept == pytest.approx(info["captured_share"], rel=1e-4)
    assert exact_k > 500 and info["k"] == exact_k  # the flat one needs most of the spectrum


def test_projector_needs_k_below_the_rank(tmp_path, aligned_pair):
    base, aligned = aligned_pair
    with pytest.raises(BasisError, match=r"v_proj.weight: the projector variant needs k < rank\(V\) = 32"):
        extract_basis(str(aligned), str(base), tmp_path / "b", modules=["v_proj"], variant="projector",
                      rank=32)


def test_sharded_and_peft_named_checkpoints_give_the_same_basis(tmp_path, aligned_pair):
    from transformers import AutoModelForCausalLM
    base, aligned = aligned_pair
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(aligned).save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").exists()
    peft_named = tmp_path / "peft"
    peft_named.mkdir()
    save_file({f"base_model.model.{k.replace('q_proj.weight', 'q_proj.base_layer.weight')}": t
               for k, t in weights(base).items()}, str(peft_named / "model.safetensors"))
    ref = extract_basis(str(aligned), str(base), tmp_path / "ref", rank=3)
    got = extract_basis(str(sharded), str(peft_named), tmp_path / "got", rank=3)
    assert got["layers"].keys() == ref["layers"].keys()
    a, b = load_basis(tmp_path / "ref"), load_basis(tmp_path / "got")
    for name in ref["layers"]:
        torch.testing.assert_close(b.layer(name).c, a.layer(name).c)
        torch.testing.assert_close(b.layer(name).U.abs(), a.layer(name).U.abs())


def test_shape_mismatch_and_missing_tensor_name_the_tensor(tmp_path, aligned_pair, tiny_model_dir):
    base, aligned = aligned_pair
    # The builtin tiny model has 176 MLP rows, the pair's base 175.
    with pytest.raises(BasisError, match=r"'model.layers.0.mlp.up_proj.weight': shape \[176, 64\] in the "
                                         r"aligned model but \[175, 64\]"):
        extract_basis(str(tiny_model_dir), str(base), tmp_path / "b", modules="q_proj,up_proj")
    partial = tmp_path / "partial"
    partial.mkdir()
    state = weights(base)
    del state["model.layers.1.self_attn.v_proj.weight"]
    save_file(state, str(partial / "model.safetensors"))
    with pytest.raises(BasisError, match=r"'model.layers.1.self_attn.v_proj.weight' of the aligned model "
                                         r"is missing from the base model"):
        extract_basis(str(aligned), str(partial), tmp_path / "b")
    with pytest.raises(BasisError, match="no 2-D weight matches modules"):
        extract_basis(str(aligned), str(base), tmp_path / "b", modules="nothing_proj")


def test_basis_match_tolerates_wrapper_prefixes(tmp_path, aligned_pair):
    base, aligned = aligned_pair
    extract_basis(str(aligned), str(base), tmp_path / "b", rank=2)
    basis = load_basis(tmp_path / "b")
    assert basis.match("base_model.model." + Q0) == Q0
    assert basis.match(Q0) == Q0
    assert basis.match("model.layers.0.self_attn.k_proj") is None


def test_full_rank_keeps_every_direction_and_is_the_dense_c(tmp_path, aligned_pair):
    # The AsFT reference's untruncated C = V V^T / ||V||_F. V of rank 3 in a 64-wide layer: the
    # full basis has k = rank(V) = 3 (not min(shape)) and U diag(c) U^T equals the dense C.
    import shutil
    base, aligned = aligned_pair
    low = tmp_path / "low_rank_aligned"
    shutil.copytree(aligned, low)
    w, b = weights(aligned), weights(base)
    g = torch.Generator().manual_seed(0)
    name = Q0 + ".weight"
    d_out, d_in = w[name].shape
    w[name] = b[name] + torch.randn(d_out, 3, generator=g) @ torch.randn(3, d_in, generator=g) * 0.1
    save_file(w, str(low / "model.safetensors"))
    manifest = extract_basis(str(low), str(base), tmp_path / "b", modules=["q_proj"], rank="full")
    assert manifest["selection"]["rank"] == "full"
    info = manifest["layers"][Q0]
    assert info["k"] == info["rank"] == 3 and info["captured_share"] == pytest.approx(1.0, abs=1e-6)
    layer = load_basis(tmp_path / "b").layer(Q0)
    v = (w[name] - b[name]).double()
    got = layer.U.double() @ torch.diag(layer.c.double()) @ layer.U.double().T
    torch.testing.assert_close(got, v @ v.T / v.norm(), atol=1e-5 * got.abs().max().item(), rtol=0)
    with pytest.raises(BasisError, match="projector"):
        extract_basis(str(low), str(base), tmp_path / "p", modules=["q_proj"], variant="projector", rank="full")
    with pytest.raises(BasisError, match="'full'"):
        extract_basis(str(low), str(base), tmp_path / "x", modules=["q_proj"], rank="all")
