"""Model configs, parameter counts, FLOPs and `pippo model info`."""
import json
from pathlib import Path

import pytest
import torch

from pippo_model import config as C
from pippo_model.diffusion import CosineSchedule, training_loss
from pippo_model.flops import forward_flops, measured_forward_flops, parameter_counts
from pippo_model.model import build_model
from pipelines.cli import main
from pipelines.weights import load_model_config

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "configs" / "models"


@pytest.mark.parametrize("name", ["test", "tiny", "full"])
def test_yaml_configs_match_the_preset_factories(name):
    assert load_model_config(MODELS / f"{name}.yaml") == C.PRESETS[name]()


def test_overrides_and_bad_keys():
    cfg = load_model_config(MODELS / "test.yaml", ["dim=256", "heads=8", "space=latent"])
    assert (cfg.dim, cfg.heads, cfg.head_dim) == (256, 8, 32)
    with pytest.raises(ValueError, match="divisible"):
        load_model_config(MODELS / "test.yaml", ["heads=5"])


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_model_info_full_counts_the_released_size(capsys):
    code, out, _ = run_cli(["model", "info", str(MODELS / "full.yaml"), "--json"], capsys)
    assert code == 0
    doc = json.loads(out)  # exactly one JSON document on stdout
    assert set(doc) == {"params", "flops_per_sample"}
    params = doc["params"]
    assert all(isinstance(v, int) for v in params.values())
    assert params["total"] == sum(v for k, v in params.items() if k != "total")
    assert 1.15e9 < params["generator"] < 1.25e9  # ~1.2 B, no dead cross-attention weights
    assert 240e6 < params["control_mlp"] < 255e6  # ~249 M
    # forward FLOPs are at least 2 x params x tokens for the transformer's linear layers
    tokens = 13 * 1024
    assert doc["flops_per_sample"] > 3 * 2 * params["generator"] * tokens


def test_model_info_human_output_and_bad_config(capsys, tmp_path):
    code, out, _ = run_cli(["model", "info", str(MODELS / "test.yaml")], capsys)
    assert code == 0 and "generator" in out and "FLOPs" in out
    code, out, err = run_cli(["model", "info", str(MODELS / "test.yaml"), "depht=3"], capsys)
    assert code == 2 and out == "" and "depht" in err and len(err.strip().splitlines()) == 1


def test_stages_change_the_module_counts():
    counts = {s: parameter_counts(C.test().for_stage(s)) for s in ("pretrain", "mid", "post")}
    assert "camera_mlp" not in counts["pretrain"] and "control_mlp" not in counts["mid"]
    assert counts["pretrain"]["generator"] == counts["mid"]["generator"] == counts["post"]["generator"]
    assert counts["pretrain"]["total"] < counts["mid"]["total"] < counts["post"]["total"]


@pytest.mark.parametrize("cfg", [C.test(resolution=64, views=3), C.test().for_stage("pretrain"),
                                 C.test(views=2).for_stage("mid"), C.test(dim=96, heads=3, depth=2, mlp_ratio=2.0)])
def test_analytic_flops_equal_torch_flop_counter(cfg):
    assert forward_flops(cfg) == measured_forward_flops(cfg)


def test_every_parameter_is_trained():
    """No dead weights: every parameter reaches the loss (nulls through CFG dropout)."""
    for p_drop in (0.0, 1.0):
        cfg = C.test(resolution=64, p_drop_reference=p_drop, p_drop_camera=p_drop, p_drop_control=p_drop)
        model = build_model(cfg).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        h = cfg.latent_size
        batch = {"views": torch.randn(2, 2, 4, h, h), "reference": torch.randn(2, 4, h, h),
                 "cameras": torch.randn(2, 2, 16), "plucker": torch.randn(2, 2, 6, 16, 16),
                 "anchor": torch.randn(2, 2, 4, h, h)}
        for _ in range(5):  # zero-initialised layers pass gradients on one step after another
            opt.zero_grad()
            training_loss(model, CosineSchedule(), batch).backward()
            opt.step()
        unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
        if p_drop == 0.0:
            assert sorted(unused) == ["null.camera", "null.control", "null.reference"]
        else:  # everything replaced by nulls: the encoders of dropped conditions get nothing
            assert not any(n.startswith("null.") for n in unused)
            assert all(n.startswith(("reference_encoder.", "control_mlp.", "camera_mlp.")) for n in unused)
