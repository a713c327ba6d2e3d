"""The camera conditioning reaches the prediction, in exactly the stages that have it, and the
held-out split (frames and cameras) is a pure function of what the samples are (issue #14, item 5).

A camera vector or Plücker map that the model ignores trains without error and samples plausible
images: the only symptom is novel views that do not move with the camera. These tests catch the
wiring: d(prediction)/d(camera vector) and d(prediction)/d(Plücker map).
"""

import pytest
import torch

from pippo_model import config as C
from pippo_model.conditioning import camera_vectors
from pippo_model.diffusion import CosineSchedule, training_loss
from pippo_model.model import build_model, load_stage_weights

torch.set_num_threads(1)


def _model(stage: str):
    return build_model(C.test(resolution=32, depth=2, dim=64, camera_hidden=64).for_stage(stage))


def _inputs(cfg, b=2, v=3, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, c = cfg.latent_size, cfg.latent_channels
    R = torch.linalg.qr(torch.randn(b, v, 3, 3, generator=g, dtype=torch.float64))[0]
    t = torch.randn(b, v, 3, generator=g, dtype=torch.float64) * 3
    return {"views": torch.randn(b, v, c, h, h, generator=g), "reference": torch.randn(b, c, h, h, generator=g),
            "cameras": camera_vectors(R, t).float().requires_grad_(),
            "plucker": torch.randn(b, v, 6, h // 2, h // 2, generator=g).requires_grad_(),
            "anchor": torch.randn(b, v, c, h, h, generator=g)}


def _perturb(model, std=0.05, seed=1):
    """Stand-in for training: every weight, zero-initialised outputs included, off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _gradients(model, inputs) -> dict:
    """|d <w, prediction> / d input| per view for the camera vector and the Plücker map (a random
    projection w of the output: a sum could cancel)."""
    x = inputs["views"]
    t = torch.tensor([300, 700])
    pred = model(x, t, {k: v for k, v in inputs.items() if k != "views"})
    w = torch.randn(pred.shape, generator=torch.Generator().manual_seed(5))
    (pred * w).sum().backward()
    out = {}
    for name in ("cameras", "plucker"):
        g = inputs[name].grad
        out[name] = torch.zeros(x.shape[:2]) if g is None else g.flatten(2).abs().sum(-1)
    return out


@pytest.mark.parametrize("stage,camera,plucker", [("pretrain", False, False), ("mid", True, False),
                                                   ("post", True, True)])
def test_prediction_depends_on_the_camera_exactly_in_the_stages_that_condition_on_it(stage, camera, plucker):
    model = _perturb(_model(stage)).eval()
    grads = _gradients(model, _inputs(model.cfg))
    # every view of every sample: a view whose camera did not reach the output is a wiring bug
    assert bool((grads["cameras"] > 0).all()) is camera, grads["cameras"]
    assert bool((grads["plucker"] > 0).all()) is plucker, grads["plucker"]
    if not camera:
        assert float(grads["cameras"].sum()) == 0.0
    if not plucker:
        assert float(grads["plucker"].sum()) == 0.0


@pytest.mark.parametrize("stage,previous", [("mid", "pretrain"), ("post", "mid")])
def test_one_training_step_after_the_handoff_opens_the_new_conditioning(stage, previous):
    """A stage starts from the previous one with its new modules zero-initialised: at step 0 the
    output ignores the new input (the handoff changes nothing), and one optimiser step on the
    diffusion loss makes it depend on it (the zero layers receive a gradient)."""
    trained_before = _perturb(_model(previous))
    model = _model(stage)
    load_stage_weights(model, trained_before.state_dict(), trained_before.cfg)
    new_input = "cameras" if stage == "mid" else "plucker"
    assert float(_gradients(model.eval(), _inputs(model.cfg))[new_input].sum()) == 0.0
    model.train()
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = {k: v.detach() for k, v in _inputs(model.cfg, seed=3).items()}
    optim.zero_grad()
    training_loss(model, CosineSchedule(), batch, torch.Generator().manual_seed(0)).backward()
    optim.step()
    assert bool((_gradients(model.eval(), _inputs(model.cfg))[new_input] > 0).all())


# -- the held-out split ----------------------------------------------------------------------------
