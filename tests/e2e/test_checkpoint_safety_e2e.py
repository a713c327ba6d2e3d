"""Checkpoints are untrusted input: nothing in a run directory can make a resume run code, hang,
or load files from outside the run (issue: resume unpickled the run's DeepSpeed files)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("zero", [2, 3])
def test_planted_pickles_are_refused_and_real_checkpoints_load(tmp_path, zero):
    """A real DeepSpeed save; copies with one file replaced by a pickle whose __reduce__ would
    create a marker: model states, optimizer states, and both through the universal conversion
    (world size changed). The untouched checkpoint loads (directly and universally) to the same
    weights; an object-store run ignores a payload planted at the old shared cache path."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "e2e" / "checkpoint_attack.py"), str(tmp_path), str(zero)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("markers") == [] and not list(tmp_path.glob("MARKER-*"))
    assert out.pop("legit") == "loaded" and out.pop("legit_universal") == "loaded"
    assert out.pop("remote_with_planted_cache") == "loaded"
    for scenario, result in out.items():
        assert result.startswith("refused: UnsafeCheckpointError"), (scenario, result)
        assert "posix.system" in result and "_states.pt" in result, result


def test_pippo_train_refuses_a_planted_checkpoint_file_in_one_line(small_version, tiny_model, tmp_path):
    """The attack through the real command: train 2 steps, plant a payload in the newest step's
    optimizer states, re-run asking for more steps (the run resumes automatically)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}

    def train(steps: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "train", "configs/stages/pretrain.yaml", f"dataset={small_version.ref}",
             f"checkpoint.root={tmp_path}/ck", f"steps={steps}", "checkpoint.every_steps=1", "tracking.sample_every=0",
             "tracking.system_metrics=false", f"model_overrides={json.dumps(tiny_model)}", "data.resolution=32",
             "data.num_workers=1", "data.batch_size=2", "optim.warmup_steps=1", "--local"],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)

    first = train(2)
    assert first.returncode == 0, first.stderr[-2000:]
    (optim,) = Path(tmp_path, "ck").glob("*/step_00000002/ds/*optim_states.pt")
    marker = tmp_path / "MARKER"
    code = ("import os, sys, torch\n"
            "class P:\n    def __reduce__(self): return (os.system, ('touch ' + sys.argv[2],))\n"
            "torch.save({'optimizer_state_dict': P()}, sys.argv[1])\n")
    subprocess.run([sys.executable, "-c", code, str(optim), str(marker)], check=True)
    again = train(3)
    assert again.returncode == 2, again.stderr[-2000:]
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pippo: error: refused checkpoint file"), lines
    assert "optim_states.pt" in lines[0] and "posix.system" in lines[0]
    assert not marker.exists()
