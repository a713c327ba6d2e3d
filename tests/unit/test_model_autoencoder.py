"""The diffusers-format KL-VAE loader, pixel-space mode and checkpoint fetching."""
import json

import fsspec
import pytest
import torch
from safetensors.torch import load_file, save_file

from pippo_model import config as C
from pippo_model.autoencoder import AutoencoderKL, PixelSpace, load_autoencoder, save_autoencoder
from pippo_model.diffusion import CosineSchedule, training_loss
from pippo_model.model import build_model
from pipelines.weights import fetch_directory, load_autoencoder as autoencoder_of

torch.set_num_threads(1)
SMALL = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4}


def small_vae(seed=0):
    torch.manual_seed(seed)
    vae = AutoencoderKL(SMALL)
    with torch.no_grad():  # default init leaves biases tiny; make every weight matter
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.eval()


def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_sdxl_layout_matches_the_published_checkpoint_size():
    with torch.device("meta"):
        vae = AutoencoderKL()  # SDXL defaults
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # stabilityai/sdxl-vae
    keys = vae.state_dict().keys()
    assert len(keys) == 248
    for key in ("encoder.down_blocks.0.downsamplers.0.conv.weight", "encoder.mid_block.attentions.0.to_q.weight",
                "decoder.up_blocks.3.resnets.2.conv2.bias", "decoder.up_blocks.2.resnets.0.conv_shortcut.weight",
                "quant_conv.weight", "post_quant_conv.bias", "encoder.conv_out.weight"):
        assert key in keys
    assert vae.downsample == 8 and vae.scaling_factor == pytest.approx(0.13025)


def test_save_reload_roundtrip_is_exact(tmp_path):
    vae = small_vae()
    save_autoencoder(vae, tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["block_out_channels"] == [32, 64]
    loaded = load_autoencoder(tmp_path / "vae")
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = images()
    z = loaded.encode(x)
    assert z.shape == (2, 4, 16, 16)  # 2 blocks: 2x down
    torch.testing.assert_close(z, vae.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.decode(z), vae.decode(z), rtol=0, atol=0)
    assert loaded.decode(z).shape == x.shape


def test_encode_is_the_scaled_posterior_mean(tmp_path):
    vae = small_vae()
    x = images()
    mean, logvar = vae.posterior(x)
    assert not torch.allclose(logvar, torch.zeros_like(logvar))  # a real distribution, not a point
    torch.testing.assert_close(vae.encode(x), mean * vae.scaling_factor)
    assert torch.equal(vae.encode(x), vae.encode(x))  # deterministic: no sampling
    shifted = AutoencoderKL({**SMALL, "shift_factor": 0.25, "scaling_factor": 0.5})
    shifted.load_state_dict(vae.state_dict())
    torch.testing.assert_close(shifted.encode(x), (mean - 0.25) * 0.5)
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(shifted.decode(z), vae.decode((z / 0.5 + 0.25) * vae.scaling_factor))


def test_legacy_attention_names_are_converted(tmp_path):
    vae = small_vae()
    save_autoencoder(vae, tmp_path / "vae")
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    legacy = {}
    for k, v in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                v = v[:, :, None, None] if v.ndim == 2 else v  # 1x1-conv-shaped, as old checkpoints
        legacy[k] = v
    assert any(".query." in k for k in legacy)
    save_file(legacy, str(path))
    x = images()
    torch.testing.assert_close(load_autoencoder(tmp_path / "vae").encode(x), vae.encode(x))


def test_incomplete_checkpoint_is_refused(tmp_path):
    vae = small_vae()
    save_autoencoder(vae, tmp_path / "vae")
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state.pop("decoder.conv_out.weight")
    save_file(state, str(path))
    with pytest.raises(RuntimeError, match="decoder.conv_out.weight"):
        load_autoencoder(tmp_path / "vae")


def test_fetch_from_an_fsspec_store_and_load(tmp_path):
    vae = small_vae()
    save_autoencoder(vae, tmp_path / "vae")
    fs = fsspec.filesystem("memory")
    for f in (tmp_path / "vae").iterdir():
        fs.pipe(f"/ckpt/vae/{f.name}", f.read_bytes())
    local = fetch_directory("memory://ckpt/vae", cache=tmp_path / "cache")
    assert (local / "config.json").exists() and local.is_relative_to(tmp_path / "cache")
    cfg = C.test(vae_path="memory://ckpt/vae")
    loaded = autoencoder_of(cfg)
    x = images()
    torch.testing.assert_close(loaded.encode(x), vae.encode(x))
    assert fetch_directory(str(tmp_path / "vae")) == tmp_path / "vae"  # local paths are used in place


def test_pixel_space_model_trains_without_a_vae():
    cfg = C.test(space="pixel", latent_channels=3, vae_downsample=1, resolution=16)
    assert cfg.tokens_per_view == 64
    assert isinstance(autoencoder_of(cfg), PixelSpace)
    ae = PixelSpace()
    x = images(4, 16).reshape(1, 4, 3, 16, 16)
    assert torch.equal(ae.decode(ae.encode(x)), x)
    model = build_model(cfg)
    batch = {"views": x, "reference": x[:, 0], "cameras": torch.randn(1, 4, 16),
             "plucker": torch.randn(1, 4, 6, 16, 16), "anchor": torch.zeros(1, 4, 3, 16, 16)}
    loss = training_loss(model, CosineSchedule(), batch)
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="pixel space"):
        C.test(space="pixel")
