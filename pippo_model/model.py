"""Pippo: generator + the conditioning modules of a stage + learned null conditions for CFG.

Conditioning dict (`cond`) of `Pippo.forward` -- the meeting point with data loaders; all
tensors in model space (VAE latents x scaling factor, or pixels in [-1, 1] in pixel space):

    "reference"  (B, C, h, w)        reference photo latent (required, never noised)
    "cameras"    (B, V, 16)          `conditioning.camera_vectors(R, t)` (if cfg.camera_mlp)
    "plucker"    (B, V, 6, H', W')   Plücker rays [d, o x d], any resolution (if cfg.control_mlp)
    "anchor"     (B, V, C, h, w)     spatial-anchor image in model space (if cfg.control_mlp)
    "view_ids"   (B, V) long         optional rows of the per-view embedding (default 0..V-1)

`drop` maps "reference" / "camera" / "control" to (B,) bool masks: where True, that condition is
replaced by its learned null (classifier-free guidance, Ho & Salimans 2022).
"""
from __future__ import annotations

import torch
from torch import nn

from .conditioning import CameraMLP, ControlMLP, ReferenceEncoder
from .config import ModelConfig
from .dit import MultiViewDiT

DROPPABLE = ("reference", "camera", "control")


class Pippo(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.generator = MultiViewDiT(cfg)
        self.reference_encoder = ReferenceEncoder(cfg)
        self.camera_mlp = CameraMLP(cfg) if cfg.camera_mlp else None
        self.control_mlp = ControlMLP(cfg) if cfg.control_mlp else None
        # learned null conditions; zero so a stage that adds one starts unchanged
        null = {"reference": nn.Parameter(torch.zeros(cfg.dim))}
        if cfg.camera_mlp:
            null["camera"] = nn.Parameter(torch.zeros(cfg.dim))
        if cfg.control_mlp:
            null["control"] = nn.Parameter(torch.zeros(cfg.dim))
        self.null = nn.ParameterDict(null)

    @property
    def conditions(self) -> tuple[str, ...]:
        """The droppable conditions this stage has."""
        return tuple(k for k in DROPPABLE if k in self.null)

    def sample_drop(self, batch_size: int, device, generator: torch.Generator | None = None) -> dict:
        """Independent per-sample CFG dropout masks with the configured probabilities."""
        probs = {"reference": self.cfg.p_drop_reference, "camera": self.cfg.p_drop_camera,
                 "control": self.cfg.p_drop_control}
        return {k: torch.rand(batch_size, generator=generator, device=device) < probs[k]
                for k in self.conditions}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict,
                drop: dict | None = None, gamma: float | None = None) -> torch.Tensor:
        """x_t (B, V, C, h, w), t (B,) -> prediction (eps or v) of the same shape as x_t."""
        drop = drop or {}
        ref = self.reference_encoder(cond["reference"])
        if "reference" in drop:
            ref = torch.where(drop["reference"][:, None, None], self.null["reference"].to(ref.dtype), ref)
        camera = None
        if self.camera_mlp is not None:
            camera = self.camera_mlp(cond["cameras"].to(x_t.dtype))
            if "camera" in drop:
                camera = torch.where(drop["camera"][:, None, None], self.null["camera"].to(camera.dtype), camera)
            ref = ref + self.camera_mlp.reference
        controls = None
        if self.control_mlp is not None:
            controls = self.control_mlp(x_t, t, cond["plucker"], cond["anchor"].to(x_t.dtype))
            if "control" in drop:
                mask = drop["control"][:, None, None]
                controls = [torch.where(mask, self.null["control"].to(c.dtype), c) for c in controls]
        return self.generator(x_t, t, ref, camera, controls, cond.get("view_ids"), gamma)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> Pippo:
    """The model of `cfg`; on device "meta" no memory is allocated (parameter counting)."""
    with torch.device(device or "cpu"):
        return Pippo(cfg)


def stage_modules(cfg: ModelConfig) -> set[str]:
    """State-dict prefixes of the modules that exist only in some stages."""
    out = set()
    if cfg.camera_mlp:
        out |= {"camera_mlp.", "null.camera"}
    if cfg.control_mlp:
        out |= {"control_mlp.", "null.control"}
    return out


def load_stage_weights(model: Pippo, state_dict: dict, source_cfg: ModelConfig | None = None) -> list[str]:
    """Load a checkpoint of the same or an earlier stage (pretrain -> mid -> post).

    Every key must match; keys absent from the checkpoint must belong to modules the new stage
    adds (they keep their zero-initialised outputs, so the model's output is unchanged at step 0).
    Returns the newly initialised keys.
    """
    result = model.load_state_dict(state_dict, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint has keys this model lacks (a later stage?): {result.unexpected_keys[:5]}")
    allowed = stage_modules(model.cfg) - (stage_modules(source_cfg) if source_cfg else set())
    stray = [k for k in result.missing_keys if not any(k.startswith(p) for p in allowed)]
    if stray:
        raise ValueError(f"checkpoint lacks keys of modules present in both stages: {stray[:5]}")
    return list(result.missing_keys)


def load_weights(path) -> dict:
    """A state dict from a local .safetensors file (preferred) or a torch file (weights only)."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)
