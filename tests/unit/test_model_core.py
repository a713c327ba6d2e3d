"""pippo_model: DiT, conditioning, stages, attention biasing, schedule, loss, DDIM and CFG."""
import math

import pytest
import torch

from pippo_model import config as C
from pippo_model import dit as dit_module
from pippo_model.attention import attention, attention_scale, naive_attention
from pippo_model.conditioning import camera_vectors
from pippo_model.diffusion import CosineSchedule, training_loss
from pippo_model.model import build_model, load_stage_weights
from pippo_model.sampler import ddim_sample, guide

torch.set_num_threads(1)
SCHEDULE = CosineSchedule()


def small(stage="post", **kw):
    return C.test(resolution=64, **kw).for_stage(stage)  # 8x8 latents, 16 tokens per view


def batch_for(cfg, b=2, v=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, c = cfg.latent_size, cfg.latent_channels
    R = torch.linalg.qr(torch.randn(b, v, 3, 3, generator=g, dtype=torch.float64))[0]
    t = torch.randn(b, v, 3, generator=g, dtype=torch.float64) * 3
    return {"views": torch.randn(b, v, c, h, h, generator=g),
            "reference": torch.randn(b, c, h, h, generator=g),
            "cameras": camera_vectors(R, t).float(),
            "plucker": torch.randn(b, v, 6, 2 * h, 2 * h, generator=g),
            "anchor": torch.randn(b, v, c, h, h, generator=g)}


def cond_of(batch):
    return {k: v for k, v in batch.items() if k != "views"}


def perturb(model, std=0.05, seed=1):
    """Stand-in for training: move every weight (zero-initialised ones included) off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def test_init_predicts_exactly_zero():
    cfg = small()
    model = build_model(cfg).eval()
    batch = batch_for(cfg)
    out = model(batch["views"], torch.tensor([10, 900]), cond_of(batch))
    assert out.shape == batch["views"].shape
    assert torch.count_nonzero(out) == 0


def test_reference_is_never_noised_and_dropped_after_last_block():
    cfg = small()
    model = perturb(build_model(cfg)).train()
    batch = batch_for(cfg)
    seen = []
    real_forward = model.forward

    def spy(x_t, t, cond, drop=None, gamma=None):
        seen.append((x_t.clone(), cond["reference"].clone()))
        return real_forward(x_t, t, cond, drop, gamma)

    model.forward = spy
    training_loss(model, SCHEDULE, batch, torch.Generator().manual_seed(0))
    model.eval()
    ddim_sample(model, SCHEDULE, cond_of(batch), batch["views"].shape, steps=3, guidance=2.0)
    assert len(seen) == 4
    for x_t, ref in seen:
        assert torch.equal(ref[: batch["reference"].shape[0]], batch["reference"])
    assert not torch.allclose(seen[0][0], batch["views"])  # the targets are noised
    # a reference of another size gives other token counts but the output is still targets only
    cond = cond_of(batch)
    cond["reference"] = torch.randn(2, cfg.latent_channels, 12, 8)
    assert model(batch["views"], torch.tensor([5, 5]), cond).shape == batch["views"].shape


@pytest.mark.parametrize("grow", [("pretrain", "mid"), ("mid", "post"), ("pretrain", "post")])
def test_adding_a_stage_leaves_a_trained_model_unchanged(grow):
    small_cfg, big_cfg = small(grow[0]), small(grow[1])
    torch.manual_seed(0)
    model = build_model(small_cfg).train()
    batch = batch_for(small_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(4):  # real optimiser steps: gates and output layer leave zero
        opt.zero_grad()
        training_loss(model, SCHEDULE, batch).backward()
        opt.step()
    model.eval()
    bigger = build_model(big_cfg).eval()
    added = load_stage_weights(bigger, model.state_dict(), small_cfg)
    assert added and all(k.startswith(("camera_mlp.", "control_mlp.", "null.")) for k in added)
    x, t = batch["views"], torch.tensor([100, 700])
    before = model(x, t, cond_of(batch))
    assert before.abs().max() > 1e-3
    assert torch.equal(bigger(x, t, cond_of(batch)), before)
    with pytest.raises(ValueError):  # the other direction drops trained modules: refused
        load_stage_weights(build_model(small_cfg), bigger.state_dict())


def test_attention_biasing_scale():
    d = 64
    assert attention_scale(d) == pytest.approx(1 / math.sqrt(d))
    assert attention_scale(d, 5000, 5000, gamma=1.0) == pytest.approx(1 / math.sqrt(d))
    n_cur, n_train, gamma = 61 * 1024, 13 * 1024, 1.5
    want = math.sqrt(gamma * math.log(n_cur) / math.log(n_train) / d)
    assert attention_scale(d, n_cur, n_train, gamma) == pytest.approx(want)
    assert attention_scale(d, n_cur, n_train, 1.0) > 1 / math.sqrt(d)  # sharper with more tokens
    q, k, v = torch.randn(3, 2, 4, 50, 16).unbind(0)
    torch.testing.assert_close(attention(q, k, v, 0.37), naive_attention(q, k, v, 0.37), rtol=1e-5, atol=1e-5)


def test_five_times_more_views_in_one_pass_uses_biasing(monkeypatch):
    cfg = small(views=2)
    model = perturb(build_model(cfg)).eval()
    batch = batch_for(cfg, b=1, v=10)  # 5x the trained views
    scales = []

    def spy(q, k, v, scale):
        scales.append((q.shape[2], scale))
        return attention(q, k, v, scale)

    monkeypatch.setattr(dit_module, "attention", spy)
    out = ddim_sample(model, SCHEDULE, cond_of(batch), batch["views"].shape, steps=2, gamma=1.5,
                      generator=torch.Generator().manual_seed(0))
    assert out.shape == batch["views"].shape and torch.isfinite(out).all()
    n_cur, n_train = 11 * cfg.tokens_per_view, 3 * cfg.tokens_per_view
    assert {n for n, _ in scales} == {n_cur}
    want = math.sqrt(1.5 * math.log(n_cur) / math.log(n_train) / cfg.head_dim)
    assert all(s == pytest.approx(want) for _, s in scales)
    # with gamma = 1 at the training length the model equals the unbiased model
    batch3 = batch_for(cfg, b=1, v=2)
    x, t = batch3["views"], torch.tensor([300])
    torch.testing.assert_close(model(x, t, cond_of(batch3), gamma=1.0), model(x, t, cond_of(batch3)))


def test_cosine_schedule_values():
    a = SCHEDULE.alpha_bar
    assert a[0].item() == pytest.approx(0.99996, abs=1e-5)
    assert a[500].item() == pytest.approx(0.492, abs=1e-3)
    assert a[999].item() == pytest.approx(2.4e-9, rel=0.05)
    assert torch.all(a[1:] < a[:-1]) and SCHEDULE.betas.max().item() == pytest.approx(0.999)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_with_an_oracle_recovers_x0(prediction):
    """A network that knows x0 predicts the exact eps (or v): DDIM must land on x0 for any eta."""
    cfg = small(prediction=prediction)
    x0 = torch.randn(1, 2, 4, 8, 8, dtype=torch.float64)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg, self.w = cfg, torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

        def forward(self, x_t, t, cond, drop=None, gamma=None):
            a = SCHEDULE.alpha_bar[t].reshape(-1, 1, 1, 1, 1)
            eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
            return eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0

    for eta in (0.0, 0.1, 1.0):
        out = ddim_sample(Oracle(), SCHEDULE, {"reference": x0[:, 0]}, x0.shape, steps=7, eta=eta,
                          generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(out, x0, rtol=1e-6, atol=1e-6)
    # clipping x0_hat to a range that contains x0 keeps the oracle exact; a narrower one bounds it
    wide = ddim_sample(Oracle(), SCHEDULE, {"reference": x0[:, 0]}, x0.shape, steps=7, clip=10.0)
    torch.testing.assert_close(wide, x0, rtol=1e-6, atol=1e-6)
    narrow = ddim_sample(Oracle(), SCHEDULE, {"reference": x0[:, 0]}, x0.shape, steps=7, eta=0.0, clip=0.5)
    assert narrow.abs().max() <= 0.5 + 1e-9


@pytest.mark.parametrize("name,keys", [("reference", ["reference"]), ("camera", ["cameras"]),
                                       ("control", ["plucker", "anchor"])])
def test_cfg_drop_replaces_a_condition_by_its_learned_null(name, keys):
    cfg = small()
    model = perturb(build_model(cfg)).eval()
    a, b = batch_for(cfg, seed=0), batch_for(cfg, seed=5)
    mixed = cond_of(a)
    for k in keys:
        mixed[k] = b[k]
    x, t = a["views"], torch.tensor([200, 600])
    drop = {name: torch.tensor([True, True])}
    assert not torch.allclose(model(x, t, cond_of(a)), model(x, t, mixed))  # the condition matters
    dropped = model(x, t, cond_of(a), drop)
    torch.testing.assert_close(dropped, model(x, t, mixed, drop))  # unless dropped
    # the null is learned: it reaches the output
    with torch.no_grad():
        model.null[name].add_(1.0)
    assert not torch.allclose(model(x, t, cond_of(a), drop), dropped)
    # per-sample masks: only the first sample loses the condition
    one = {name: torch.tensor([True, False])}
    out = model(x, t, cond_of(a), one)
    torch.testing.assert_close(out[1], model(x, t, cond_of(a))[1])
    assert not torch.allclose(out[0], model(x, t, cond_of(a))[0])


def test_training_dropout_follows_the_configured_probabilities():
    for p, want in ((1.0, True), (0.0, False)):
        cfg = small(p_drop_reference=p, p_drop_camera=p, p_drop_control=p)
        model = build_model(cfg).train()
        drop = model.sample_drop(64, "cpu", torch.Generator().manual_seed(0))
        assert set(drop) == {"reference", "camera", "control"}
        assert all(bool(m.all()) is want and bool(m.any()) is want for m in drop.values())
    half = build_model(small(p_drop_reference=0.5)).sample_drop(4000, "cpu")["reference"]
    assert 0.45 < half.float().mean() < 0.55
    assert set(build_model(small("pretrain")).sample_drop(3, "cpu")) == {"reference"}


def test_guidance_combines_conditional_and_null_passes():
    cfg = small()
    model = perturb(build_model(cfg)).eval().double()  # float64: step T-1 amplifies rounding 2e4x
    batch = {k: v.double() for k, v in batch_for(cfg, b=1).items()}
    cond, shape = cond_of(batch), batch["views"].shape
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(m, **kw):
        return ddim_sample(m, SCHEDULE, cond, shape, steps=3, eta=0.0, noise=noise, **kw)

    class AlwaysNull(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.cfg = model, model.cfg

        def forward(self, x, t, c, drop=None, gamma=None):
            n = x.shape[0]
            return model(x, t, c, {k: torch.ones(n, dtype=torch.bool) for k in model.conditions}, gamma)

    cond_only = run(model)
    torch.testing.assert_close(run(model, guidance=1.0), cond_only)
    torch.testing.assert_close(run(model, guidance=0.0), run(AlwaysNull()))
    assert not torch.allclose(run(model, guidance=3.0), cond_only)
    # dropping only the camera in the unconditional pass differs from dropping everything
    assert not torch.allclose(run(model, guidance=3.0, guidance_drop=("camera",)), run(model, guidance=3.0))


def test_guidance_rescale_matches_conditional_std():
    g = torch.Generator().manual_seed(0)
    ec, eu = torch.randn(2, 3, 4, 8, 8, generator=g), torch.randn(2, 3, 4, 8, 8, generator=g) * 0.3
    plain = guide(ec, eu, 5.0)
    torch.testing.assert_close(plain, eu + 5.0 * (ec - eu))
    torch.testing.assert_close(guide(ec, eu, 5.0, rescale=0.0), plain)
    full = guide(ec, eu, 5.0, rescale=1.0)
    torch.testing.assert_close(full.flatten(1).std(1), ec.flatten(1).std(1))
    torch.testing.assert_close(guide(ec, eu, 5.0, rescale=0.7), 0.7 * full + 0.3 * plain)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = perturb(build_model(small(grad_checkpointing=ckpt, p_drop_reference=0.0,
                                          p_drop_camera=0.0, p_drop_control=0.0)))
        loss = training_loss(model, SCHEDULE, batch_for(model.cfg), torch.Generator().manual_seed(4))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_camera_vectors_are_scale_invariant_and_embed_the_pose():
    g = torch.Generator().manual_seed(0)
    R = torch.linalg.qr(torch.randn(4, 3, 3, generator=g, dtype=torch.float64))[0]
    t = torch.randn(4, 3, generator=g, dtype=torch.float64)
    v = camera_vectors(R, t)
    torch.testing.assert_close(camera_vectors(R, 1000 * t), v)  # millimetres vs metres
    m = v.reshape(4, 4, 4)
    torch.testing.assert_close(m[:, :3, :3], R)
    centres = -(R.transpose(1, 2) @ t[..., None])[..., 0]
    torch.testing.assert_close(m[:, :3, 3], t / centres.norm(dim=1).mean())


def test_weights_round_trip_through_safetensors_and_torch_files(tmp_path):
    from safetensors.torch import save_file

    from pippo_model.model import load_weights

    cfg = small("mid")
    model = perturb(build_model(cfg)).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "mid.safetensors"))
    torch.save(state, tmp_path / "mid.pt")
    batch = batch_for(cfg)
    x, t = batch["views"], torch.tensor([50, 500])
    for name in ("mid.safetensors", "mid.pt"):
        post = build_model(small("post")).eval()
        load_stage_weights(post, load_weights(tmp_path / name), cfg)
        torch.testing.assert_close(post(x, t, cond_of(batch)), model(x, t, cond_of(batch)), rtol=0, atol=0)
