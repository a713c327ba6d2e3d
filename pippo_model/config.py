"""Model configuration: one plain dataclass, presets as factory functions.

A training stage is a configuration of which conditioning modules exist:

    pretrain  reference encoder only (image-conditioned generation, 1 view)
    mid       + camera MLP (many low-resolution views)
    post      + ControlMLP (Plücker rays and spatial anchor, few high-resolution views)

`ModelConfig.for_stage` switches those flags, so one size preset (test / tiny / full) serves every
stage and a smaller stage's checkpoint loads into the next stage's model (see `pippo_model.model`).
YAML files live in configs/models/ and are read by pipelines (pippo_model does no I/O).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from pippo_common.checks import check_resolution

STAGE_MODULES = {
    "pretrain": {"camera_mlp": False, "control_mlp": False},
    "mid": {"camera_mlp": True, "control_mlp": False},
    "post": {"camera_mlp": True, "control_mlp": True},
}


# Upper bounds far above every preset (full: dim 1536, depth 28, 512 px, ~1.5 B parameters).
INT_BOUNDS = {"dim": (1, 16384), "depth": (1, 512), "heads": (1, 1024), "patch_size": (1, 64),
              "latent_channels": (1, 64), "vae_downsample": (1, 64), "resolution": (1, 16384),
              "views": (1, 4096), "max_views": (1, 65536), "camera_hidden": (1, 65536),
              "timesteps": (1, 100_000)}
FLOAT_BOUNDS = {"mlp_ratio": (0.01, 64.0), "siren_w0": (1e-3, 1e4), "vae_scaling_factor": (1e-6, 1e3),
                "p_drop_reference": (0.0, 1.0), "p_drop_camera": (0.0, 1.0), "p_drop_control": (0.0, 1.0)}
MAX_TOKENS_PER_VIEW = 256 * 256
MAX_TOKENS = 1 << 26
MAX_PARAMETERS = 50e9


@dataclass
class ModelConfig:
    name: str = "custom"
    # --- transformer (Pippo §3: DiT with joint multi-view self-attention) ---
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 2
    qk_norm: bool = True
    grad_checkpointing: bool = False  # recompute each block in backward (activation memory ~ 1 block)
    # --- data space ---
    space: Literal["latent", "pixel"] = "latent"  # latent = SDXL VAE (8x down); pixel = VIVID-style
    latent_channels: int = 4  # 4 for the SDXL VAE, 3 in pixel space
    vae_downsample: int = 8  # pixels per latent cell (1 in pixel space)
    vae_scaling_factor: float = 0.13025
    vae_path: str | None = None  # diffusers AutoencoderKL directory (local or object-store URI)
    resolution: int = 128  # training side in pixels (square); other sizes interpolate the pos-embed
    views: int = 4  # training target views per sample (FLOPs accounting, default N_train)
    max_views: int = 256  # rows of the per-view embedding table (>= 5x the training views)
    # --- conditioning modules (which exist = the stage) ---
    camera_mlp: bool = False
    camera_hidden: int = 1024
    control_mlp: bool = False
    siren_channels: tuple[int, ...] = (16, 32, 32)
    siren_w0: float = 30.0
    # --- attention biasing (Pippo eq. 4); tokens of one training sample incl. the reference ---
    attn_n_train: int | None = None  # None = (views + 1) * tokens per view at `resolution`
    # --- diffusion ---
    prediction: Literal["eps", "v"] = "eps"
    timesteps: int = 1000
    # --- classifier-free guidance dropout (per sample, training only) ---
    p_drop_reference: float = 0.1
    p_drop_camera: float = 0.1
    p_drop_control: float = 0.1

    def __post_init__(self):
        self._check_bounds()
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.space == "pixel" and (self.vae_downsample != 1 or self.latent_channels != 3):
            raise ValueError("pixel space needs latent_channels=3 and vae_downsample=1")
        check_resolution(self.resolution, self.vae_downsample * self.patch_size)
        for p in ("p_drop_reference", "p_drop_camera", "p_drop_control"):
            if not 0.0 <= getattr(self, p) <= 1.0:
                raise ValueError(f"{p} must lie in [0, 1]")
        self.siren_channels = tuple(self.siren_channels)

    def _check_bounds(self) -> None:
        """Types and sane ranges of the sizes: a model.json read from a run directory is input,
        and `dim: 10**9` or `resolution: -8` must be one clear error, not an allocation that
        exhausts the machine (or a traceback from deep inside torch)."""
        for name, (lo, hi) in INT_BOUNDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        for name, (lo, hi) in FLOAT_BOUNDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
        if self.attn_n_train is not None and (isinstance(self.attn_n_train, bool) or not isinstance(
                self.attn_n_train, int) or not 1 <= self.attn_n_train <= MAX_TOKENS):
            raise ValueError(f"attn_n_train must be null or an integer in [1, {MAX_TOKENS}]")
        channels = self.siren_channels
        if (not isinstance(channels, (list, tuple)) or not 1 <= len(channels) <= 16
                or any(isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= 4096 for c in channels)):
            raise ValueError("siren_channels must be 1 to 16 integers in [1, 4096]")
        if self.vae_path is not None and not isinstance(self.vae_path, str):
            raise ValueError("vae_path must be null or a string")
        cell = self.vae_downsample * self.patch_size
        if (self.resolution // cell) ** 2 > MAX_TOKENS_PER_VIEW:
            raise ValueError(f"resolution {self.resolution} makes {(self.resolution // cell) ** 2} tokens per "
                             f"view (at most {MAX_TOKENS_PER_VIEW})")
        approx = self.depth * self.dim * self.dim * (10 + 2 * self.mlp_ratio)   # per block: qkv, out, mlp, adaLN
        if approx > MAX_PARAMETERS:
            raise ValueError(f"dim {self.dim} x depth {self.depth} is ~{approx / 1e9:.0f} B parameters "
                             f"(at most {MAX_PARAMETERS / 1e9:.0f} B)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_downsample

    @property
    def grid_size(self) -> int:
        """Tokens per side of one view."""
        return self.latent_size // self.patch_size

    @property
    def tokens_per_view(self) -> int:
        return self.grid_size ** 2

    @property
    def n_train_tokens(self) -> int:
        """N_train of attention biasing: training sequence length, reference counted as a view."""
        return self.attn_n_train or (self.views + 1) * self.tokens_per_view

    def for_stage(self, stage: str) -> "ModelConfig":
        """This size with the conditioning modules of `stage` (pretrain | mid | post)."""
        if stage not in STAGE_MODULES:
            raise ValueError(f"unknown stage {stage!r} (pretrain, mid or post)")
        return dataclasses.replace(self, **STAGE_MODULES[stage])


def test(**kw) -> ModelConfig:
    """A few million parameters: CPU tests and benches."""
    base = dict(name="test", dim=128, depth=4, heads=4, camera_hidden=128, resolution=128,
                views=4, max_views=32, camera_mlp=True, control_mlp=True)
    return ModelConfig(**{**base, **kw})


def tiny(**kw) -> ModelConfig:
    """Released 'tiny' size (dim 768, depth 12) at 128 px, 4 views."""
    base = dict(name="tiny", dim=768, depth=12, heads=12, resolution=128, views=4,
                camera_mlp=True, control_mlp=True)
    return ModelConfig(**{**base, **kw})


def full(**kw) -> ModelConfig:
    """Released 'full' size (dim 1536, depth 28, 24 heads; ~1.2 B generator, ControlMLP ~249 M)."""
    base = dict(name="full", dim=1536, depth=28, heads=24, resolution=512, views=12, grad_checkpointing=True,
                camera_mlp=True, control_mlp=True)
    return ModelConfig(**{**base, **kw})


PRESETS = {"test": test, "tiny": tiny, "full": full}
