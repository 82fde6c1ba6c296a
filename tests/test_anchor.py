"""Safety anchoring (AsFT) in the trainer and the Safe LoRA baseline.

The anchored runs use a projector basis (k = 6 per layer), so the penalty is exactly the update's
energy outside span(U_k), and a large lambda (300) so the anchor visibly steers a few steps of
training. Single-rank jobs run the console command in this process (`cli`: the same code as the
`safebasin` script without an interpreter start-up per run); two-rank jobs start real ranks.
"""

import hashlib
import json
import os
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, safebasin_cli
from safebasin.launcher.config import ConfigError, build
from safebasin.safety_core.anchor import variants
from safebasin.safety_core.anchor.basis import BasisError, extract_basis, load_basis
from safebasin.safety_core.anchor.regularizer import AnchorArgs, AnchorRegularizer
from safebasin.safety_core.anchor.safe_lora import project_adapter

K = 6
LAMBDA = 300.0


def cli(*argv) -> int:
    """`safebasin ARGV` in this process; returns the exit code. The environment is restored after
    (a single-rank job sets RANK, MASTER_PORT, ... for torch.distributed)."""
    from safebasin.launcher.cli import main
    saved = dict(os.environ)
    try:
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in argv])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return exit_.value.code


@pytest.fixture(scope="module")
def basis_dir(tmp_path_factory, aligned_pair) -> Path:
    base, aligned = aligned_pair
    out = tmp_path_factory.mktemp("basis") / "projector"
    extract_basis(str(aligned), str(base), out, modules="q_proj,v_proj,up_proj", variant="projector", rank=K)
    return out


@pytest.fixture(scope="module")
def safelora_basis_dir(tmp_path_factory, aligned_pair) -> Path:
    base, aligned = aligned_pair
    out = tmp_path_factory.mktemp("basis") / "safelora"
    extract_basis(str(aligned), str(base), out, modules="q_proj,v_proj,up_proj", variant="safelora", rank=K)
    return out


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, aligned_pair, basis_dir, safelora_basis_dir):
    """train_run(method, stage, lam, nproc) -> (rows of metrics.jsonl, output dir); each distinct
    run once per module. One global batch of 8 per step: 4 x 2 accumulation on 1 rank, 4 x 1 on
    2 ranks, so 1 and 2 ranks see the same examples per step."""
    root = tmp_path_factory.mktemp("anchor-runs")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    done = {}

    def run(method: str, stage: int, lam: float | None, nproc: int = 1,
            variant: str | None = None) -> tuple[list[dict], Path]:
        key = (method, stage, lam, nproc) + ((variant,) if variant else ())
        if key not in done:
            out = root / "-".join(map(str, key))
            cfg = {
                "model": {"path": str(aligned_pair[0])},
                "method": {"type": method, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                "data": {"train": {"path": "builtin:task"}, "num_examples": 64, "max_length": 96},
                "train": {"max_steps": 4, "lr": 2e-3 if method == "lora" else 5e-4, "micro_batch_size": 4,
                          "gradient_accumulation_steps": 2 if nproc == 1 else 1, "warmup_steps": 1, "seed": 1},
                "deepspeed": {"stage": stage},
                "tracking": {"experiment": "anchor-test", "uri": env["MLFLOW_TRACKING_URI"]},
                "output": {"dir": str(out)},
            }
            if lam is not None:
                cfg["anchor"] = {"basis": str(basis_dir), "lambda": lam}
            if variant is not None:
                cfg["anchor"]["variant"] = variant
                if variant == "safelora-normalized":
                    cfg["anchor"]["basis"] = str(safelora_basis_dir)
            path = root / f"{out.name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            if nproc == 1:
                assert cli("train", path) == 0
            else:
                res = safebasin_cli("train", str(path), "--nproc", str(nproc), cwd=root, env=env)
                assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
            done[key] = ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], out)
        return done[key]
    return run


def column(rows, key):
    return [r[key] for r in rows]


# ---------------------------------------------------------------------------------------------
# Config and the regularizer itself (no DeepSpeed)


def test_anchor_config_section(basis_dir):
    raw = {"model": {"path": "builtin:tiny-llama"}, "anchor": {"basis": str(basis_dir), "lambda": 0.5}}
    cfg = build(raw)
    assert cfg.anchor.lam == 0.5 and cfg.anchor.include_lora_scaling is False
    assert cfg.model_dump(by_alias=True)["anchor"]["lambda"] == 0.5
    with pytest.raises(ConfigError, match="did you mean 'anchor.lambda'"):
        build({**raw, "anchor": {"basis": str(basis_dir), "lamda": 1}})
    assert cfg.anchor.basis_problem() is None
    assert "holds no manifest.json" in build({**raw, "anchor": {"basis": str(basis_dir.parent)}}).anchor.basis_problem()
    with pytest.raises(ConfigError, match="anchor.lambda"):
        build({**raw, "anchor": {"basis": str(basis_dir), "lambda": -1}})


def peft_model(base: Path, targets=("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    return get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), task_type="CAUSAL_LM"))


def dense_terms(delta: torch.Tensor, U: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(||(I - C) delta||^2 with C materialised in float64, differentiable; energy outside
    span(U); ||delta||^2)."""
    U, c = U.double(), c.double()
    C = U @ torch.diag(c) @ U.T
    d = delta.double()
    penalty = (d - C @ d).pow(2).sum()
    outside = float((d - U @ (U.T @ d)).detach().pow(2).sum())
    return penalty, outside, float(d.detach().pow(2).sum())


@pytest.fixture(params=["projector", "safelora"])
def any_basis(request, basis_dir, safelora_basis_dir) -> Path:
    return basis_dir if request.param == "projector" else safelora_basis_dir


def check_against_dense(reg, model, params, deltas, basis, scale=3 * 0.7):
    """The first micro-batch's added loss and its gradient, the step's other micro-batches and
    the metrics, against the dense float64 formula."""
    dense, outside, energy = 0.0, 0.0, 0.0
    for path, delta in deltas:
        lb = basis.layer(basis.match(path))
        p, o, e = dense_terms(delta, lb.U, lb.c)
        dense, outside, energy = dense + p, outside + o, energy + e
    expected = torch.autograd.grad(dense, params)
    added = reg.loss(model)
    # One micro-batch carries grad_accum * lambda * P; DeepSpeed divides it by grad_accum.
    torch.testing.assert_close(added.double(), scale * dense.detach(), rtol=1e-5, atol=0)
    got = torch.autograd.grad(added / scale, params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-4, atol=1e-7)
    assert reg.loss(model) is None and reg.loss(model) is None  # the step's other micro-batches
    metrics = reg.before_step(engine=None)
    assert metrics["anchor_penalty"] == pytest.approx(float(dense), rel=1e-5)
    assert metrics["anchor_outside_share"] == pytest.approx(outside / energy, rel=1e-5)
    assert reg.loss(model) is not None  # the next step starts again
    return metrics


def test_lora_regularizer_matches_the_dense_formula(aligned_pair, any_basis):
    torch.manual_seed(0)
    model = peft_model(aligned_pair[0])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    reg = AnchorRegularizer(AnchorArgs(basis=str(any_basis), **{"lambda": 0.7}), model,
                            {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 3})
    assert reg.method == "lora" and len(reg.layers) == 4
    deltas = [(path, m.lora_B["default"].weight @ m.lora_A["default"].weight)
              for path, m in model.named_modules() if "default" in getattr(m, "lora_A", {})]
    metrics = check_against_dense(reg, model, [p for p in model.parameters() if p.requires_grad],
                                  deltas, load_basis(any_basis))
    if "safelora" in str(any_basis):  # c_i < 1: the penalised and the outside energies differ
        assert metrics["anchor_penalty"] > 1.01 * metrics["anchor_outside_share"] * sum(
            float(d.detach().pow(2).sum()) for _, d in deltas)


def test_include_lora_scaling_penalises_the_scaled_update(aligned_pair, basis_dir):
    model = peft_model(aligned_pair[0])  # alpha / r = 8 / 4
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    ds = {"zero_optimization": {"stage": 0}}
    plain = AnchorRegularizer(AnchorArgs(basis=str(basis_dir)), model, ds).loss(model)
    scaled = AnchorRegularizer(AnchorArgs(basis=str(basis_dir), include_lora_scaling=True), model, ds).loss(model)
    torch.testing.assert_close(scaled, 4 * plain)


def test_full_parameter_regularizer_matches_the_dense_formula(aligned_pair, any_basis):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(aligned_pair[0])
    reg = AnchorRegularizer(AnchorArgs(basis=str(any_basis), **{"lambda": 0.7}), model,
                            {"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 3})
    # Every basis layer (q, v, up_proj of 2 layers) is anchored; the other weights train freely.
    assert reg.method == "full" and len(reg.layers) == 6
    torch.manual_seed(0)
    initial = {layer.name: layer.W.detach().clone() for layer in reg.layers}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    deltas = [(layer.name, layer.W - initial[layer.name]) for layer in reg.layers]
    check_against_dense(reg, model, [layer.W for layer in reg.layers], deltas, load_basis(any_basis))


def test_adapted_layer_without_basis_layer_is_an_error(aligned_pair, basis_dir):
    model = peft_model(aligned_pair[0], targets=("q_proj", "k_proj"))
    with pytest.raises(BasisError, match=r"adapted layer '.*layers.0.self_attn.k_proj' has no layer in the basis"):
        AnchorRegularizer(AnchorArgs(basis=str(basis_dir)), model, {"zero_optimization": {"stage": 0}})


# ---------------------------------------------------------------------------------------------
# Through the trainer


def lora_outside_share(adapter: Path, basis_dir: Path) -> float:
    """Measured from the exported adapter, independently of the regularizer's own metric."""
    from safetensors.torch import load_file
    state = load_file(str(adapter / "adapter_model.safetensors"))
    basis = load_basis(basis_dir)
    outside = total = 0.0
    for key, A in state.items():
        if ".lora_A." not in key:
            continue
        B = state[key.replace(".lora_A.", ".lora_B.")]
        U = basis.layer(basis.match(key.split(".lora_A.")[0])).U
        delta = B.double() @ A.double()
        outside += float((delta - U.double() @ (U.double().T @ delta)).pow(2).sum())
        total += float(delta.pow(2).sum())
    return outside / total


def test_lambda_zero_is_exact_and_lambda_keeps_the_lora_update_in_the_basis(train_run, basis_dir):
    plain, _ = train_run("lora", 2, None)
    zero, zero_dir = train_run("lora", 2, 0.0)
    anchored, anchored_dir = train_run("lora", 2, LAMBDA)
    assert column(zero, "loss") == column(plain, "loss")
    assert column(zero, "grad_norm") == column(plain, "grad_norm")
    assert "anchor_penalty" not in plain[0] and zero[0]["anchor_penalty"] == 0.0
    free = lora_outside_share(zero_dir / "adapter", basis_dir)
    kept = lora_outside_share(anchored_dir / "adapter", basis_dir)
    # A random rank-4 update of a 64-row layer has about 1 - 6/64 of its energy outside U_6; the
    # task's own update shares some directions with the alignment (0.82 on the built-in sets).
    assert free > 0.75 and kept < free - 0.15
    assert anchored[-1]["anchor_outside_share"] < zero[-1]["anchor_outside_share"] - 0.15
    assert column(anchored, "loss")[-1] != column(zero, "loss")[-1]


# Float32 sums in another order (two ranks, the sharded all-reduce, autograd against the closed
# form, DeepSpeed's flat buffers of another stage): observed agreement is about 1e-7 relative;
# the tolerances leave a wide margin and are far below the anchor's effect (tens of percent).
LOSS_TOL = dict(rel=1e-5, abs=1e-6)
PENALTY_TOL = dict(rel=1e-4, abs=1e-9)


def assert_same_run(rows, reference):
    assert column(rows, "loss") == pytest.approx(column(reference, "loss"), **LOSS_TOL)
    assert column(rows, "anchor_penalty") == pytest.approx(column(reference, "anchor_penalty"), **PENALTY_TOL)
    if rows[0]["grad_norm"] is not None:  # DeepSpeed reports none under ZeRO-0
        assert column(rows, "grad_norm") == pytest.approx(column(reference, "grad_norm"), rel=1e-5)


@pytest.mark.parametrize("stage", [0, 1])
def test_lora_anchor_on_zero_stages_0_and_1_matches_stage_2(train_run, stage):
    assert_same_run(train_run("lora", stage, LAMBDA)[0], train_run("lora", 2, LAMBDA)[0])


def test_lambda_zero_is_exact_under_zero3_full_parameter(train_run):
    plain, _ = train_run("full", 3, None)
    zero, _ = train_run("full", 3, 0.0)
    assert column(zero, "loss") == column(plain, "loss")
    assert column(zero, "grad_norm") == column(plain, "grad_norm")


@pytest.mark.multiproc
def test_zero3_full_parameter_two_ranks_match_one_rank_and_autograd(train_run):
    one, _ = train_run("full", 3, LAMBDA)
    two, two_dir = train_run("full", 3, LAMBDA, nproc=2)
    autograd, _ = train_run("full", 2, LAMBDA)
    free, _ = train_run("full", 3, 0.0)
    assert_same_run(two, one)
    assert_same_run(autograd, one)
    shares, free_shares = column(one, "anchor_outside_share"), column(free, "anchor_outside_share")
    assert shares[0] is None and free_shares[0] is None  # DeltaW = 0 before the first update
    # The anchor pulls the update in: ~1 - 6/64 of a free update's energy lies outside U_6.
    assert free_shares[-1] > 0.85 and shares[-1] < free_shares[-1] - 0.1
    assert (two_dir / "model" / "model.safetensors").exists()


@pytest.mark.multiproc
def test_zero3_lora_two_ranks_match_autograd(train_run):
    assert_same_run(train_run("lora", 3, LAMBDA, nproc=2)[0], train_run("lora", 2, LAMBDA)[0])


# ---------------------------------------------------------------------------------------------
# The example, as its comment tells a user to run it


def documented_commands(example: Path) -> list[list[str]]:
    """The `safebasin ...` command lines of a YAML's leading comment (with backslash continuations)."""
    lines = [line[1:].strip() for line in example.read_text().splitlines() if line.startswith("#")]
    commands, current = [], None
    for line in lines:
        if current is not None:
            current += " " + line.rstrip("\\").strip()
        elif line.startswith("safebasin "):
            current = line.rstrip("\\").strip()
        if current is not None and not line.endswith("\\"):
            commands.append(shlex.split(current)[1:])
            current = None
    return commands


def test_example_tiny_anchor_lora_from_a_clean_state(tmp_path, monkeypatch, session_cache):
    """The commands of examples/tiny_anchor_lora.yaml in an empty folder, single-rank ones only
    (two ranks are covered above), each shortened by overrides: the stand-in aligned model, its
    basis, then the anchored fine-tune with its metrics in metrics.jsonl and MLflow."""
    from mlflow.tracking import MlflowClient
    commands = documented_commands(REPO / "examples" / "tiny_anchor_lora.yaml")
    assert [c[0] for c in commands] == ["train", "align-basis", "train", "train"]
    (tmp_path / "examples").mkdir()
    for name in ("tiny_full_zero3.yaml", "tiny_anchor_lora.yaml"):
        (tmp_path / "examples" / name).write_text((REPO / "examples" / name).read_text())
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    short = ["train.max_steps=3", "train.eval_every=0", "train.save_every=0", "data.num_examples=48"]
    for argv in commands:
        if "--nproc" in argv:
            continue
        assert cli(*argv, *(short if argv[0] == "train" else [])) == 0, argv

    manifest = json.loads(Path("runs/tiny_basis/manifest.json").read_text())
    assert manifest["variant"] == "projector" and manifest["modules"] == ["q_proj", "v_proj"]
    assert manifest["aligned"] == "runs/tiny_aligned/model" and manifest["base"] == "builtin:tiny-llama"
    assert set(manifest["layers"]) == {f"model.layers.{i}.self_attn.{m}"
                                       for i in range(2) for m in ("q_proj", "v_proj")}
    for info in manifest["layers"].values():
        assert info["k"] == 8 and info["shape"] in ([64, 64], [32, 64]) and 0 < info["captured_share"] < 1

    out = Path("runs/tiny_anchor_lora")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["loss"] > 0 and row["anchor_penalty"] >= 0
    assert all(0 < row["anchor_outside_share"] <= 1 for row in rows[1:])  # B = 0 at step 1
    run_id = json.loads((out / "results.json").read_text())["mlflow_run_id"]
    client = MlflowClient(uri)
    for key in ("loss", "anchor_penalty", "anchor_outside_share"):
        history = client.get_metric_history(run_id, key)
        want = [r[key] for r in rows if r[key] is not None]
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(want), key
    assert (out / "adapter" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Safe LoRA


@pytest.fixture
def adapter_dir(tmp_path, aligned_pair, basis_dir) -> Path:
    """An adapter whose layer-0 q_proj update lies inside span(U_6) (cosine 1) and whose other
    updates are random (cosine about sqrt(6/64) or sqrt(6/32))."""
    torch.manual_seed(0)
    model = peft_model(aligned_pair[0])
    basis = load_basis(basis_dir)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
            if "layers.0.self_attn.q_proj" in name:
                U = basis.layer("model.layers.0.self_attn.q_proj").U
                p.data = U @ torch.randn(K, p.shape[1])
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_safe_lora_projects_the_low_cosine_layers(tmp_path, adapter_dir, basis_dir, aligned_pair):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    before = digest(adapter_dir)
    report = project_adapter(adapter_dir, basis_dir, tmp_path / "safe", threshold=0.5)
    assert digest(adapter_dir) == before  # the input adapter is never written
    layers = report["layers"]
    q0 = next(m for m in layers if "layers.0.self_attn.q_proj" in m)
    assert layers[q0]["cosine"] == pytest.approx(1.0, abs=1e-6) and not layers[q0]["projected"]
    assert all(row["projected"] and row["cosine"] < 0.5 for m, row in layers.items() if m != q0)
    assert report["num_projected"] == 3

    old = load_file(str(adapter_dir / "adapter_model.safetensors"))
    new = load_file(str(tmp_path / "safe" / "adapter_model.safetensors"))
    basis = load_basis(basis_dir)
    for module, row in layers.items():
        b_key = next(k for k in old if k.startswith(module + ".lora_B"))
        U = basis.layer(row["basis_layer"]).U
        want = U @ (U.T @ old[b_key]) if row["projected"] else old[b_key]
        torch.testing.assert_close(new[b_key], want, rtol=1e-5, atol=1e-6)
        a_key = b_key.replace("lora_B", "lora_A")
        assert torch.equal(new[a_key], old[a_key])
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(aligned_pair[0]), tmp_path / "safe")
    assert any("lora_B" in n for n, _ in loaded.named_parameters())
    assert json.loads((tmp_path / "safe" / "safe_lora_report.json").read_text())["num_projected"] == 3

    lowest = min(layers, key=lambda m: layers[m]["cosine"])
    by_count = project_adapter(adapter_dir, basis_dir, tmp_path / "one", num_layers=1)
    assert [m for m, r in by_count["layers"].items() if r["projected"]] == [lowest]


def test_cli_align_basis_and_safe_lora_project(tmp_path, aligned_pair, adapter_dir, tiny_model_dir, capsys):
    from safebasin.launcher.cli import build_parser
    usage = build_parser().format_help()
    assert "align-basis" in usage and "safe-lora-project" in usage
    base, aligned = aligned_pair
    res = safebasin_cli("align-basis", "--aligned", str(aligned), "--base", str(base), "--out",
                        str(tmp_path / "b"), "--modules", "q_proj,v_proj", "--variant", "projector",
                        "--rank", "4", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["aligned"] == str(aligned) and manifest["base"] == str(base)
    assert manifest["modules"] == ["q_proj", "v_proj"] and manifest["variant"] == "projector"
    v1 = manifest["layers"]["model.layers.1.self_attn.v_proj"]
    assert v1["k"] == 4 and v1["shape"] == [32, 64] and v1["rank"] == 32 and 0 < v1["captured_share"] < 1
    capsys.readouterr()
    assert cli("safe-lora-project", "--adapter", adapter_dir, "--basis", tmp_path / "b",
               "--out", tmp_path / "safe", "--num-layers", "2") == 0
    assert "projected 2 of 4 adapted layers" in capsys.readouterr().out
    assert json.loads((tmp_path / "safe" / "safe_lora_report.json").read_text())["num_projected"] == 2

    # Failures exit 2 with the reason on stderr, before any work.
    assert cli("align-basis", "--aligned", tiny_model_dir, "--base", base, "--out", tmp_path / "bad",
               "--modules", "up_proj") == 2
    assert "'model.layers.0.mlp.up_proj.weight': shape [176, 64] in the aligned model" in capsys.readouterr().err
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(base)}, "data": {"train": {"path": "builtin:task"}},
                                   "train": {"max_steps": 1}, "anchor": {"basis": str(tmp_path / "none")},
                                   "output": {"dir": str(tmp_path / "out")}}))
    assert cli("train", cfg) == 2
    err = capsys.readouterr().err
    assert "anchor.basis" in err and "holds no manifest.json" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The controls (l2, aligned), the scale-free safelora-normalized, and the anchor's scale


def dense_variant(delta: torch.Tensor, U: torch.Tensor, c: torch.Tensor, variant: str,
                  layer: str = "") -> torch.Tensor:
    """The variant's penalty with C materialised in float64 from the basis's stored c."""
    d = delta.double()
    if variant == "l2":
        return d.pow(2).sum()
    U, c = variants.directions(variant, layer, U.double()), c.double()
    if variant in ("safelora-normalized", "aligned"):
        c = c / c.max()
    if variant == "projector":
        c = torch.ones_like(c)
    C = U @ torch.diag(c) @ U.T
    return (C @ d).pow(2).sum() if variant == "aligned" else (d - C @ d).pow(2).sum()


CONTROL_CASES = [("safelora-normalized", "safelora"), ("aligned", "safelora"), ("aligned", "projector"),
                 ("random-subspace", "safelora"), ("projector", "safelora"), ("l2", "projector"), ("l2", None)]


@pytest.mark.parametrize("variant,basis_kind", CONTROL_CASES)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_variant_regularizer_matches_the_dense_formula(aligned_pair, basis_dir, safelora_basis_dir,
                                                       method, variant, basis_kind):
    from transformers import AutoModelForCausalLM
    path = {"safelora": safelora_basis_dir, "projector": basis_dir, None: None}[basis_kind]
    args = AnchorArgs(basis=None if path is None else str(path), variant=variant, **{"lambda": 0.7})
    ds = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 3}
    torch.manual_seed(0)
    if method == "lora":
        model = peft_model(aligned_pair[0])
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1)
        reg = AnchorRegularizer(args, model, ds)
        mods = [(p, m) for p, m in model.named_modules() if "default" in getattr(m, "lora_A", {})]
        deltas = [(p, m.lora_B["default"].weight @ m.lora_A["default"].weight) for p, m in mods]
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        model = AutoModelForCausalLM.from_pretrained(aligned_pair[0])
        reg = AnchorRegularizer(args, model, ds)
        initial = {layer.name: layer.W.detach().clone() for layer in reg.layers}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        deltas = [(layer.name, layer.W - initial[layer.name]) for layer in reg.layers]
        params = [layer.W for layer in reg.layers]
        # Without a basis l2 anchors every trainable 2-D weight; with one, the basis's layers.
        assert len(reg.layers) == (6 if path is not None else
                                   sum(1 for n, p in model.named_parameters() if p.dim() == 2))
    basis = load_basis(path) if path is not None else None
    dense = 0.0
    for name, delta in deltas:
        key = basis.match(name) if basis is not None else None
        lb = basis.layer(key) if basis is not None else None
        dense = dense + dense_variant(delta, lb.U if lb else None, lb.c if lb else None, variant, key)
    expected = torch.autograd.grad(dense, params)
    added = reg.loss(model)
    torch.testing.assert_close(added.double(), 3 * 0.7 * dense.detach(), rtol=1e-5, atol=0)
    for g, e in zip(torch.autograd.grad(added / (3 * 0.7), params), expected):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-4, atol=1e-7)
    metrics = reg.before_step(engine=None)
    assert metrics["anchor_penalty"] == pytest.approx(float(dense.detach()), rel=1e-5)
    assert (metrics["anchor_outside_share"] is None) == (path is None)


def test_random_subspace_keeps_the_spectrum_on_other_directions(safelora_basis_dir):
    """The control for "any subspace of that size": per layer an orthonormal Q of U's shape, the
    same on every call (so on every rank and run), nearly orthogonal to the alignment span, with
    safelora's c; an update inside span(U) that safelora spares is penalised by it almost as L2."""
    basis = load_basis(safelora_basis_dir)
    name = basis.names[0]
    lb = basis.layer(name)
    q = variants.directions("random-subspace", name, lb.U)
    assert q.shape == lb.U.shape and q.dtype == lb.U.dtype
    torch.testing.assert_close(q.T @ q, torch.eye(q.shape[1]), atol=1e-5, rtol=0)
    assert torch.equal(q, variants.directions("random-subspace", name, lb.U.clone()))
    assert not torch.equal(q, variants.directions("random-subspace", basis.names[1], lb.U))
    assert torch.equal(variants.directions("safelora", name, lb.U), lb.U)
    # overlap of two k-dim subspaces of R^d: E ||U^T Q||_F^2 = k^2 / d for a random Q
    d, k = lb.U.shape
    assert float((lb.U.T @ q).pow(2).sum()) < 3 * k * k / d + 0.5
    inside = lb.U[:, :1] @ torch.randn(1, lb.shape[1], dtype=lb.U.dtype)
    spared = dense_variant(inside, lb.U, lb.c, "safelora", name)
    control = dense_variant(inside, lb.U, lb.c, "random-subspace", name)
    assert control > spared and control > 0.5 * inside.double().pow(2).sum()
    assert variants.compatibility_problem("random-subspace", "projector").startswith(
        "variant 'random-subspace' needs a safelora basis")


def test_variant_config_is_validated(basis_dir, safelora_basis_dir):
    raw = {"model": {"path": "builtin:tiny-llama"}}
    assert build({**raw, "anchor": {"variant": "l2", "lambda": 2}}).anchor.basis is None
    with pytest.raises(ConfigError, match="anchor.basis is required"):
        build({**raw, "anchor": {"variant": "aligned"}})
    with pytest.raises(ConfigError, match="anchor.variant"):
        build({**raw, "anchor": {"basis": str(basis_dir), "variant": "l1"}})
    mismatch = build({**raw, "anchor": {"basis": str(basis_dir), "variant": "safelora-normalized"}})
    assert "needs a safelora basis" in mismatch.anchor.basis_problem()
    assert build({**raw, "anchor": {"basis": str(safelora_basis_dir), "variant": "safelora-normalized"}}
                 ).anchor.basis_problem() is None


def test_manifest_records_the_anchor_scale(aligned_pair, safelora_basis_dir):
    from safetensors.torch import load_file
    base, aligned = aligned_pair
    basis = load_basis(safelora_basis_dir)
    name = "model.layers.0.self_attn.q_proj"
    info = basis.manifest["layers"][name]
    V = (load_file(str(aligned / "model.safetensors"))[f"{name}.weight"].double()
         - load_file(str(base / "model.safetensors"))[f"{name}.weight"].double())
    assert info["fro_norm"] == pytest.approx(float(V.norm()), rel=1e-6)
    c = basis.layer(name).c
    assert info["c_max"] == pytest.approx(float(c.max())) and info["c_median"] == pytest.approx(float(c.median()))
    sigma1 = float(torch.linalg.svdvals(V)[0])
    assert info["c_max"] == pytest.approx(sigma1 ** 2 / float(V.norm()), rel=1e-5)
    assert info["c_sum"] == pytest.approx(float(c.sum()), rel=1e-6)
    assert info["l2_gap"] == pytest.approx(float((2 * c - c * c).abs().max()), rel=1e-6)
    # The same numbers, from the c the penalty uses, go with the first step's metrics.
    reg = AnchorRegularizer(AnchorArgs(basis=str(safelora_basis_dir)), peft_model(base), {"zero_optimization": {"stage": 0}})
    row = reg.strengths[name]
    assert row["c_max"] == pytest.approx(info["c_max"]) and row["l2_gap"] == pytest.approx(info["l2_gap"], rel=1e-6)
    from safebasin.safety_core.anchor.variants import strength_summary
    first = strength_summary(reg.strengths)
    assert first["anchor_l2_gap"] == pytest.approx(max(r["l2_gap"] for r in reg.strengths.values()))


def test_a_small_alignment_delta_warns_that_the_anchor_is_near_l2(tmp_path, aligned_pair, capsys):
    """A delta a tenth of the test pair's: c_i = sigma_i^2 / ||V||_F shrinks tenfold, the
    safelora anchor is within a few percent of plain L2 and says so; the normalized variant on
    the same basis has c_max = 1 and does not warn."""
    import warnings

    from safebasin.safety_core.anchor.regularizer import AnchorScaleWarning
    from safetensors.torch import load_file, save_file
    base, aligned = aligned_pair
    small = tmp_path / "small-aligned"
    small.mkdir()
    for f in aligned.iterdir():
        if f.name != "model.safetensors":
            (small / f.name).write_bytes(f.read_bytes())
    a, b = load_file(str(aligned / "model.safetensors")), load_file(str(base / "model.safetensors"))
    save_file({k: b[k] + 0.1 * (a[k] - b[k]) for k in a}, str(small / "model.safetensors"), metadata={"format": "pt"})
    extract_basis(str(small), str(base), tmp_path / "basis", modules="q_proj,v_proj", variant="safelora", rank=K)
    manifest = load_basis(tmp_path / "basis").manifest
    assert max(i["c_max"] for i in manifest["layers"].values()) < 0.02
    model = peft_model(base)
    ds = {"zero_optimization": {"stage": 0}}
    with pytest.warns(AnchorScaleWarning, match="within .* of plain L2"):
        AnchorRegularizer(AnchorArgs(basis=str(tmp_path / "basis"), **{"lambda": 10}), model, ds)
    assert "at most" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error", AnchorScaleWarning)
        AnchorRegularizer(AnchorArgs(basis=str(tmp_path / "basis"), variant="safelora-normalized"), model, ds)
    assert "safelora-normalized" in capsys.readouterr().out


@pytest.mark.multiproc
@pytest.mark.parametrize("method,variant", [("full", "l2"), ("full", "aligned"), ("lora", "safelora-normalized")])
def test_zero3_two_ranks_match_autograd_for_each_new_variant(train_run, method, variant):
    two, _ = train_run(method, 3, LAMBDA, nproc=2, variant=variant)
    autograd, _ = train_run(method, 2, LAMBDA, variant=variant)
    assert_same_run(two, autograd)
    assert two[-1]["anchor_penalty"] > 0


def test_departure_from_l2_is_the_largest_gap_in_any_direction():
    """(1 - c)^2 against L2's 1: the gap is |2 c - c^2|. A direction with c = 2.5 makes the anchor
    stronger than L2 there (gap 1.25), which the layer maximum's 2 m - m^2 would call negative,
    i.e. near L2."""
    from safebasin.safety_core.anchor.variants import strength
    line, warning = strength("safelora", 1.0, [torch.tensor([2.5, 0.01])], [16])
    assert warning is None and "125.0%" in line
    line, warning = strength("safelora", 1.0, [torch.tensor([0.01, 0.005])], [16])
    assert warning is not None and "2.0%" in line


def test_l2_without_a_basis_passes_preflight_on_a_local_model(tmp_path, tiny_model_dir):
    """anchor.variant l2 needs no basis: preflight must not try to open one."""
    from safebasin.launcher.preflight import check_inputs
    cfg = build({"model": {"path": str(tiny_model_dir)}, "method": {"type": "lora"},
                 "data": {"train": {"path": "builtin:task"}}, "anchor": {"variant": "l2", "lambda": 1},
                 "output": {"dir": str(tmp_path / "out")}})
    check_inputs(cfg, "train")


def test_the_asft_reference_preset_runs_with_the_untruncated_basis(tmp_path, aligned_pair):
    # examples/asft_reference_lora.yaml as shipped, pointed at the tiny pair (the base model has the
    # tokenizer, so the run starts from it) and shortened: the
    # basis keeps every direction of V (k = rank(V) per layer), the anchor trains at lambda 1 on
    # the unscaled B A, and the LR falls by 0.85 per epoch.
    base, aligned = aligned_pair
    assert cli("align-basis", "--aligned", aligned, "--base", base, "--out", tmp_path / "basis",
               "--modules", "q_proj,v_proj", "--rank", "full") == 0
    manifest = json.loads((tmp_path / "basis" / "manifest.json").read_text())
    assert all(info["k"] == info["rank"] == min(info["shape"]) for info in manifest["layers"].values())
    out = tmp_path / "run"
    assert cli("train", REPO / "examples" / "asft_reference_lora.yaml", f"model.path={base}",
               "model.dtype=float32", "train.precision=fp32", f"anchor.basis={tmp_path / 'basis'}",
               "data.train={path: 'builtin:task'}", "data.harmful_mix.source={path: 'builtin:harmful'}",
               "data.num_examples=32", "data.max_length=96", "train.epochs=2", "train.save_every=0",
               "tracking.enabled=false", f"output.dir={out}", "runtime.threads=1") == 0
    rows = column([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()], "lr")
    assert rows == pytest.approx([5e-5] * 3 + [4.25e-5] * 4 + [3.6125e-5])  # 4 steps an epoch
    penalties = column([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()], "anchor_penalty")
    assert all(p > 0 for p in penalties[1:])
