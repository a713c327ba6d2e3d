"""Exponential moving average of the weights, partitioned across ranks like ZeRO-3.

Each rank keeps the EMA of its own 1/N slice of every parameter (fp32), so the EMA costs 4Ψ/N
bytes per rank under every ZeRO stage, and is correct under ZeRO-3 where no rank ever holds a whole
parameter: there the slice IS the rank's fp32 partition (`safe_get_local_fp32_param`, padded to
ceil(numel/N) exactly as ZeRO-3 partitions). Under ZeRO-0/1/2 the module's parameters are whole on
every rank and the slice is cut from them with the same padding rule. Consolidation is one
all_gather per parameter; saving writes each rank's slices, and loading re-slices when the world
size changed (the slices of all ranks concatenate to the padded flat parameter).

The decay follows the usual warm-up (e.g. timm's ModelEmaV2, DiT training scripts):
    ema <- d * ema + (1 - d) * theta,  d = min(decay, (1 + n) / (10 + n)),  n = optimiser steps.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def slice_bounds(numel: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of `rank`'s padded slice of a flat parameter of `numel` elements."""
    chunk = math.ceil(numel / world)
    return rank * chunk, (rank + 1) * chunk


def local_slice(p: torch.nn.Parameter, rank: int, world: int) -> torch.Tensor:
    """This rank's fp32 slice of `p` (a copy), padded with zeros to ceil(numel / world)."""
    if _zero3(p):
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p).detach().float().reshape(-1).clone()
    start, end = slice_bounds(p.numel(), rank, world)
    flat = p.detach().reshape(-1)[start:end].float()
    return torch.nn.functional.pad(flat, (0, (end - start) - flat.numel()))


class ShardedEMA:
    def __init__(self, module: torch.nn.Module, decay: float, rank: int = 0, world: int = 1):
        self.decay, self.rank, self.world = decay, rank, world
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in self.params.items()}
        self.slices = {n: local_slice(p, rank, world) for n, p in self.params.items()}
        self.updates = 0

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        d = self.decay_at(self.updates)
        names = list(self.slices)
        current = [local_slice(self.params[n], self.rank, self.world) for n in names]
        torch._foreach_lerp_([self.slices[n] for n in names], current, 1.0 - d)
        self.updates += 1

    # -- consolidation (collective: every rank calls it) ----------------------------------------
    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole EMA weights on every rank (fp32, CPU)."""
        out = {}
        for n, s in self.slices.items():
            if self.world > 1:
                parts = [torch.empty_like(s) for _ in range(self.world)]
                dist.all_gather(parts, s)
                flat = torch.cat(parts)
            else:
                flat = s
            numel = math.prod(self.shapes[n])
            out[n] = flat[:numel].reshape(self.shapes[n]).cpu().clone()
        return out

    # -- checkpoint ---------------------------------------------------------------------------------
    def local_state(self) -> dict[str, torch.Tensor]:
        return {n: s.cpu().contiguous() for n, s in self.slices.items()}

    def metadata(self) -> dict[str, str]:
        return {"world_size": str(self.world), "rank": str(self.rank), "updates": str(self.updates)}

    @torch.no_grad()
    def load(self, per_rank: list[dict[str, torch.Tensor]], updates: int) -> None:
        """Restore from the slices of every rank of a checkpoint (any world size)."""
        for n, s in self.slices.items():
            if len(per_rank) == self.world:
                s.copy_(per_rank[self.rank][n].to(s.device))
                continue
            flat = torch.cat([r[n] for r in per_rank])[: math.prod(self.shapes[n])]
            start, end = slice_bounds(flat.numel(), self.rank, self.world)
            mine = flat[start:end]
            s.zero_()
            s[: mine.numel()].copy_(mine.to(s.device))
        self.updates = updates
