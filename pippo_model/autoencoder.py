"""Autoencoders behind one interface: a frozen KL-VAE (diffusers AutoencoderKL on-disk format,
our own module definition so diffusers is not needed) and the identity of pixel-space mode.

Interface: `.channels`, `.downsample`, `encode(images in [-1, 1]) -> model-space latents`
(the posterior MEAN times the scaling factor: conditioning latents must be deterministic),
`decode(latents) -> images in [-1, 1]`.

On-disk format (a directory): config.json + diffusion_pytorch_model.safetensors with the SDXL
layout (encoder/decoder down/up blocks of ResnetBlock2D, a mid block with one single-head
attention, quant_conv / post_quant_conv). Checkpoints with the older attention names
(query/key/value/proj_attn, possibly 1x1-conv shaped) are converted on load.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CONFIG = {  # SDXL VAE (stabilityai/sdxl-vae config.json)
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "scaling_factor": 0.13025, "shift_factor": None, "mid_block_add_attention": True,
    "use_quant_conv": True, "use_post_quant_conv": True,
}
WEIGHTS = "diffusion_pytorch_model.safetensors"


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> Conv3x3, twice, plus a 1x1 shortcut when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class SpatialAttention(nn.Module):
    """Single-head self-attention over the pixels of the bottleneck, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(y)[:, None] for proj in (self.to_q, self.to_k, self.to_v))
        y = F.scaled_dot_product_attention(q, k, v)[:, 0]
        y = self.to_out[0](y).transpose(1, 2).reshape(b, c, h, w)
        return x + y


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialAttention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 Conv3x3 after asymmetric (right/bottom) zero padding, as diffusers does."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """A down (encoder) or up (decoder) block: `n` resnets then an optional resampler."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, resample: type | None, kind: str):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n))
        if resample is not None:
            setattr(self, kind, nn.ModuleList([resample(cout)]))
        self.kind = kind if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.kind is not None:
            x = getattr(self, self.kind)[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        ch, g, n = cfg["block_out_channels"], cfg["norm_num_groups"], cfg["layers_per_block"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Stage(ch[max(i - 1, 0)], ch[i], n, g, Downsample if i < len(ch) - 1 else None, "downsamplers")
            for i in range(len(ch)))
        self.mid_block = MidBlock(ch[-1], g, cfg["mid_block_add_attention"])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg["latent_channels"], 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        ch, g, n = cfg["block_out_channels"][::-1], cfg["norm_num_groups"], cfg["layers_per_block"]
        self.conv_in = nn.Conv2d(cfg["latent_channels"], ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg["mid_block_add_attention"])
        self.up_blocks = nn.ModuleList(
            Stage(ch[max(i - 1, 0)], ch[i], n + 1, g, Upsample if i < len(ch) - 1 else None, "upsamplers")
            for i in range(len(ch)))
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg["out_channels"], 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """KL-regularised VAE (Rombach et al. 2022) with diffusers' parameter names."""

    def __init__(self, config: dict | None = None):
        super().__init__()
        self.config = {**DEFAULT_CONFIG, **(config or {})}
        c = self.config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        z = c["latent_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if c["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if c["use_post_quant_conv"] else None
        self.channels = z
        self.downsample = 2 ** (len(c["block_out_channels"]) - 1)
        self.scaling_factor = float(c["scaling_factor"])
        self.shift_factor = float(c["shift_factor"] or 0.0)

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the diagonal Gaussian q(z | x), in raw (unscaled) latent units."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (N, 3, H, W) -> model-space latents (z_mean - shift) * scale."""
        mean, _ = self.posterior(images)
        return (mean - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor + self.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


class PixelSpace(nn.Module):
    """No VAE (VIVID-style pixel-space diffusion): model space = images in [-1, 1]."""

    channels = 3
    downsample = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


_RENAMES = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def _convert_legacy(state: dict) -> dict:
    """Old diffusers attention names (and 1x1-conv-shaped attention weights) -> current layout."""
    out = {}
    for key, value in state.items():
        if ".attentions." in key:
            for old, new in _RENAMES.items():
                key = key.replace(f".{old}", f".{new}")
            if value.ndim == 4 and key.endswith(".weight") and "group_norm" not in key:
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def save_autoencoder(vae: AutoencoderKL, directory: str | Path) -> None:
    """Write `vae` as config.json + diffusion_pytorch_model.safetensors (diffusers layout)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "AutoencoderKL", **vae.config,
              "down_block_types": ["DownEncoderBlock2D"] * len(vae.config["block_out_channels"]),
              "up_block_types": ["UpDecoderBlock2D"] * len(vae.config["block_out_channels"]),
              "act_fn": "silu"}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(directory / WEIGHTS))


def load_autoencoder(directory: str | Path, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A frozen AutoencoderKL from a local diffusers-format directory (nothing is downloaded;
    pipelines fetch object-store checkpoints to a local directory first)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text())
    if raw.get("act_fn", "silu") != "silu":
        raise ValueError(f"{directory}: unsupported act_fn {raw['act_fn']!r}")
    for kinds, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(k != want for k in raw.get(kinds, [want])):
            raise ValueError(f"{directory}: unsupported {kinds} {raw[kinds]}")
    config = {k: raw[k] for k in DEFAULT_CONFIG if k in raw}
    vae = AutoencoderKL(config)
    weights = directory / WEIGHTS
    if weights.exists():
        state = load_file(str(weights))
    else:
        state = torch.load(directory / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)
    vae.load_state_dict(_convert_legacy(state), strict=True)
    vae.requires_grad_(False)
    return vae.eval().to(device=device, dtype=dtype)
