"""Learning: a test-size model overfits one 4-view synthetic capture (pixel space, post stage)."""
import numpy as np
import pytest
import torch

from pippo_model import config as C
from pippo_model.conditioning import camera_vectors
from pippo_model.diffusion import CosineSchedule, conditions, training_loss
from pippo_model.metrics.image import psnr
from pippo_model.model import build_model
from pippo_model.sampler import ddim_sample

synth = pytest.importorskip("dataprep.studio.synth")
geometry = pytest.importorskip("dataprep.studio.geometry")
anchors = pytest.importorskip("dataprep.studio.anchors")

SIZE, STEPS = 32, 240


def capture_batch():
    """View 0 of a synthetic capture is the reference photo, views 1-4 the targets."""
    views = synth.render_views(5, SIZE, SIZE, seed=0)
    pose = synth.head_pose_for_frame(0, 0)

    def image(a):  # (H, W, 3) or (3, H, W) uint8 -> (3, H, W) in [-1, 1]
        a = torch.from_numpy(np.ascontiguousarray(a))
        return (a.permute(2, 0, 1) if a.shape[-1] == 3 else a).float() / 127.5 - 1

    targets = views[1:]
    R = torch.tensor(np.stack([v["R"] for v in targets]))
    t = torch.tensor(np.stack([v["t"] for v in targets]))
    return {
        "views": torch.stack([image(v["image"]) for v in targets])[None],
        "reference": image(views[0]["image"])[None],
        "cameras": camera_vectors(R, t).float()[None],
        "plucker": torch.tensor(np.stack([geometry.plucker(v["K"], v["R"], v["t"], SIZE, SIZE)
                                          for v in targets])).float()[None],
        "anchor": torch.stack([image(anchors.draw_anchor(v["K"], v["R"], v["t"], SIZE, SIZE, pose).image)
                               for v in targets])[None],
    }


def test_overfits_one_capture_and_samples_approach_the_views():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = C.test(space="pixel", latent_channels=3, vae_downsample=1, resolution=SIZE, patch_size=4,
                 p_drop_reference=0.0, p_drop_camera=0.0, p_drop_control=0.0)
    model = build_model(cfg)
    schedule = CosineSchedule()
    batch = capture_batch()
    train = {k: v.expand(2, *v.shape[1:]) for k, v in batch.items()}
    # fixed evaluation of the objective: 64 noise levels spanning [0, T-1], fixed noise
    t_eval = torch.linspace(0, schedule.timesteps - 1, 64).long()
    noise = torch.randn((64, *batch["views"].shape[1:]), generator=torch.Generator().manual_seed(0))
    ev = {k: v.expand(64, *v.shape[1:]) for k, v in batch.items()}

    @torch.no_grad()
    def eval_loss():
        model.eval()
        pred = model(schedule.q_sample(ev["views"], t_eval, noise), t_eval, conditions(ev))
        model.train()
        return torch.mean((pred - noise) ** 2).item()

    @torch.no_grad()
    def sample_psnr():
        model.eval()
        out = ddim_sample(model, schedule, conditions(batch), batch["views"].shape, steps=10, eta=0.0,
                          clip=1.0, generator=torch.Generator().manual_seed(1))
        model.train()
        return psnr(out[0], batch["views"][0]).mean().item()

    loss0, psnr0 = eval_loss(), sample_psnr()
    assert loss0 == pytest.approx(1.0, abs=0.05)  # zero prediction at init: E[eps^2] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    model.train()
    for _ in range(STEPS):
        opt.zero_grad()
        training_loss(model, schedule, train).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    loss1, psnr1 = eval_loss(), sample_psnr()
    assert loss1 < loss0 / 10, (loss0, loss1)
    assert psnr1 > psnr0 + 4.0, (psnr0, psnr1)
