"""Checkpoints are untrusted input: nothing in a run directory can make a resume run code, hang,
or load files from outside the run (issue: resume unpickled the run's DeepSpeed files)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.training.checkpoint import CheckpointError, CheckpointStore, load_safetensors, node_scratch
from pipelines.training.safe_load import UnsafeCheckpointError, verify_tree

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("zero", [2, 3])
def test_planted_pickles_are_refused_and_real_checkpoints_load(tmp_path, zero):
    """A real DeepSpeed save; copies with one file replaced by a pickle whose __reduce__ would
    create a marker: model states, optimizer states, and both through the universal conversion
    (world size changed). The untouched checkpoint loads (directly and universally) to the same
    weights; an object-store run ignores a payload planted at the old shared cache path."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "checkpoint_attack.py"), str(tmp_path), str(zero)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("markers") == [] and not list(tmp_path.glob("MARKER-*"))
    assert out.pop("legit") == "loaded" and out.pop("legit_universal") == "loaded"
    assert out.pop("remote_with_planted_cache") == "loaded"
    for scenario, result in out.items():
        assert result.startswith("refused: UnsafeCheckpointError"), (scenario, result)
        assert "posix.system" in result and "_states.pt" in result, result


def test_latest_pointer_cannot_leave_the_run(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    outside = tmp_path / "elsewhere" / "step_00000009"
    outside.mkdir(parents=True)
    (outside / "COMPLETE").write_text("ok\n")
    (outside / "trainer.json").write_text(json.dumps({"step": 9, "world_size": 1}))
    store.write_json({"step": 2, "world_size": 1}, "step_00000002", "trainer.json")
    (tmp_path / "run" / "step_00000002" / "COMPLETE").write_text("ok\n")
    for bad in ("../elsewhere/step_00000009", "/etc", "step_00000002/../../elsewhere/step_00000009", 7):
        store.write_json({"step": 9, "dir": bad}, "latest")
        assert store.latest()["dir"] == "step_00000002", bad      # the pointer is ignored; listing wins
    with pytest.raises(CheckpointError, match="not a step directory"):
        store.load_into(None, {"dir": "../elsewhere/step_00000009", "world_size": 1}, 1, 0)


def test_non_regular_files_are_refused_without_reading(tmp_path):
    ds = tmp_path / "step" / "ds"
    ds.mkdir(parents=True)
    os.mkfifo(ds / "mp_rank_00_model_states.pt")                 # opening it would block forever
    with pytest.raises(UnsafeCheckpointError, match="not a regular file"):
        verify_tree(ds)
    os.remove(ds / "mp_rank_00_model_states.pt")
    os.symlink("/dev/zero", ds / "mp_rank_00_model_states.pt")
    with pytest.raises(UnsafeCheckpointError, match="not a regular file"):
        verify_tree(ds)
    final = tmp_path / "final"
    final.mkdir()
    os.mkfifo(final / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_safetensors(str(final / "model.safetensors"))
    (final / "trainer.json").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="not a regular file"):
        CheckpointStore(str(tmp_path)).read_json("final", "trainer.json")


def test_scratch_directories_are_private_and_unpredictable():
    a, b = node_scratch(0), node_scratch(0)
    try:
        assert a != b and a.parent == b.parent
        assert stat.S_IMODE(os.stat(a).st_mode) == 0o700 and os.stat(a).st_uid == os.getuid()
    finally:
        a.rmdir(), b.rmdir()


@pytest.fixture(scope="module")
def small_version(tmp_path_factory, ray_local):
    from dataprep.build import run_build
    from dataprep.build_config import BuildConfig, ShardLimits, Source
    from dataprep.synth import synth_capture, synth_images

    root = tmp_path_factory.mktemp("ckpt_data")
    synth_capture(root / "captures" / "cap0", cameras=6, frames=4, height=96, width=64, seed=3)
    synth_images(root / "photos", count=6, seed=3, person_fraction=1.0)
    uri = str(root / "store" / "ds")
    cfg = BuildConfig(dataset=uri, sources=[Source("captures", str(root / "captures")),
                                            Source("images", str(root / "photos"))],
                      resolution=64, plucker_stride=8, shard=ShardLimits(max_samples=8), partitions=1)
    return f"{uri}@{run_build(cfg, {})}"


def test_pippo_train_refuses_a_planted_checkpoint_file_in_one_line(small_version, tmp_path):
    """The attack through the real command: train 2 steps, plant a payload in the newest step's
    optimizer states, re-run asking for more steps (the run resumes automatically)."""
    model = {"space": "pixel", "latent_channels": 3, "vae_downsample": 1, "patch_size": 4, "resolution": 32,
             "dim": 32, "depth": 1, "heads": 2, "camera_hidden": 32}
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}

    def train(steps: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "train", "configs/stages/pretrain.yaml", f"dataset={small_version}",
             f"checkpoint.root={tmp_path}/ck", f"steps={steps}", "checkpoint.every_steps=1", "tracking.sample_every=0",
             "tracking.system_metrics=false", f"model_overrides={json.dumps(model)}", "data.resolution=32",
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


def test_weights_cache_is_private_and_verified(tmp_path):
    """The per-user cache of remote weights (VAE directories): a cache root others can write is
    refused; a cached copy whose files changed after the fetch (a planted file) is fetched again."""
    import fsspec

    from pippo_common.errors import UserError
    from pipelines.model_commands import fetch_directory

    fs = fsspec.filesystem("memory")
    fs.pipe("/weights-test/vae/config.json", b'{"a": 1}')
    fs.pipe("/weights-test/vae/diffusion_pytorch_model.safetensors", b"real weights")
    cache = tmp_path / "cache"
    got = fetch_directory("memory://weights-test/vae", cache=cache)
    assert (got / "diffusion_pytorch_model.safetensors").read_bytes() == b"real weights"
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    (got / "diffusion_pytorch_model.safetensors").write_bytes(b"planted")
    (got / "extra.bin").write_bytes(b"planted too")
    again = fetch_directory("memory://weights-test/vae", cache=cache)
    assert (again / "diffusion_pytorch_model.safetensors").read_bytes() == b"real weights"
    assert not (again / "extra.bin").exists()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UserError, match="writable by nobody else"):
        fetch_directory("memory://weights-test/vae", cache=shared)
