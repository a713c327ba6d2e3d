"""Run by tests/test_checkpoint_safety.py in a fresh process (it owns a gloo process group):
saves a real DeepSpeed checkpoint through CheckpointStore, then loads copies of it in which one
file was replaced by a pickle whose __reduce__ would create a marker file. Prints one JSON line:
{scenario: "loaded" | "refused: <message>"} and whether any marker appeared.

usage: python tests/e2e/checkpoint_attack.py WORKDIR ZERO_STAGE
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch


class Payload:
    """What an attacker plants: unpickling it runs a command (here: creates a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def engine_for(zero: int, universal: bool):
    import deepspeed

    from pipelines.training.engine import deepspeed_config

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    base = {"zero_optimization": {"stage": zero}}
    cfg = deepspeed_config(base, micro_batch=2, grad_accum=1, grad_clip=1.0, precision="fp32", universal=universal)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def main(work: Path, zero: int) -> dict:
    from pipelines.training.checkpoint import CheckpointStore
    from pipelines.training.engine import setup_distributed

    setup_distributed(use_ray=False)
    clean = CheckpointStore(str(work / "clean"))
    engine = engine_for(zero, universal=False)
    x = torch.randn(2, 8)
    engine.backward(engine(x).pow(2).sum())
    engine.step()
    clean.save(engine, 1, {}, {"world_size": 1, "samples": 2, "zero_stage": zero}, keep_last=2)
    want = [p.detach().clone() for p in engine.module.parameters()]

    def attempt(name: str, target: str | None, world_size: int) -> str:
        run = work / name
        shutil.copytree(work / "clean", run)
        if target:
            matches = sorted((run / "step_00000001" / "ds").glob(target))
            assert matches, (target, os.listdir(run / "step_00000001" / "ds"))
            torch.save({"optimizer_state_dict": Payload(str(work / f"MARKER-{name}"))}, matches[0])
        store = CheckpointStore(str(run))
        resume = store.latest()
        resume["world_size"] = world_size         # != 1: the universal conversion path
        fresh = engine_for(zero, universal=world_size != 1)
        try:
            store.load_into(fresh, resume, world_size=1, local_rank=0)
        except Exception as exc:                    # noqa: BLE001 - the test reads the message
            return f"refused: {type(exc).__name__}: {exc}"
        same = all(torch.equal(a, b) for a, b in zip(want, fresh.module.parameters()))
        return "loaded" if same else "loaded different weights"

    def remote_with_planted_cache() -> str:
        """The run on an object store (memory:// here): a payload planted where older versions
        cached downloads (a predictable path in the shared /tmp) must never be looked at."""
        import hashlib
        import tempfile

        import fsspec

        remote = CheckpointStore("memory://pippo-test/run")
        fs = fsspec.filesystem("memory")
        for path in (work / "clean").rglob("*"):
            if path.is_file():
                fs.pipe(f"/pippo-test/run/{path.relative_to(work / 'clean').as_posix()}", path.read_bytes())
        key = hashlib.sha256(remote.url("step_00000001").encode()).hexdigest()[:16]
        planted = Path(tempfile.gettempdir()) / "pippo-ckpt-cache" / key
        shutil.rmtree(planted, ignore_errors=True)
        shutil.copytree(work / "clean" / "step_00000001", planted)
        for f in (planted / "ds").glob("*.pt"):
            torch.save({"module": Payload(str(work / "MARKER-planted-cache"))}, f)
        before = set(Path(tempfile.gettempdir()).glob("pippo-ckpt-*"))
        fresh = engine_for(zero, universal=False)
        remote.load_into(fresh, remote.latest(), world_size=1, local_rank=0)
        shutil.rmtree(planted.parent, ignore_errors=True)
        left = set(Path(tempfile.gettempdir()).glob("pippo-ckpt-*")) - before
        same = all(torch.equal(a, b) for a, b in zip(want, fresh.module.parameters()))
        return ("loaded" if same else "loaded different weights") + (f", scratch left: {left}" if left else "")

    results = {
        "remote_with_planted_cache": remote_with_planted_cache(),
        "legit": attempt("legit", None, 1),
        "legit_universal": attempt("legit_universal", None, 2),
        "model_states": attempt("model_states", "*model_states.pt", 1),
        "optim_states": attempt("optim_states", "*optim_states.pt", 1),
        "universal_optim": attempt("universal_optim", "*optim_states.pt", 2),
        "universal_model": attempt("universal_model", "*model_states.pt", 2),
    }
    results["markers"] = sorted(p.name for p in work.glob("MARKER-*"))
    return results


if __name__ == "__main__":
    out = main(Path(sys.argv[1]), int(sys.argv[2]))
    print(json.dumps(out))
