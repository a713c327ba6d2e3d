"""Fail-fast checks on the driver (issue 16, items 2-5), through the real `pippo` command: a
stopped MLflow server, incompatible stages and checkpoints, exit codes and stdout, and configs
used from another directory."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PIPPO = [sys.executable, "-m", "pipelines.cli"]


def pippo(*args, cwd=None, env=None, timeout=300):
    """(exit code, stdout, stderr, seconds) of `pippo ARGS` in a fresh process, this checkout's code."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    start = time.monotonic()
    proc = subprocess.run([*PIPPO, *map(str, args)], cwd=cwd or REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start


# -- item 2: an unreachable tracking server is one line, in seconds ---------------------------------


# -- item 5: paths inside a config resolve against the config's file -------------------------------

def test_config_paths_resolve_against_the_config_file(tmp_path, monkeypatch, caplog):
    from pipelines.training.launcher import load_stage_config

    (tmp_path / "cfg" / "models").mkdir(parents=True)
    (tmp_path / "cfg" / "models" / "m.yaml").write_text("name: test\n")
    (tmp_path / "cfg" / "stage.yaml").write_text(
        f"stage: pretrain\ndataset: d\nmodel: models/m.yaml\ndeepspeed: {REPO}/configs/deepspeed/zero2.json\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_stage_config(tmp_path / "cfg" / "stage.yaml")
    assert cfg.model == str(tmp_path / "cfg" / "models" / "m.yaml")
    # an override is a command-line path: relative to the working directory, as written
    assert load_stage_config(tmp_path / "cfg" / "stage.yaml", ["model=mine.yaml"]).model == "mine.yaml"
    # the run's name follows the files' content, not where they are: same name from any directory
    monkeypatch.chdir(tmp_path)
    assert load_stage_config("cfg/stage.yaml").resolved_run_name() == cfg.resolved_run_name()

    # back-compat: a config naming a path relative to the working directory still works, with a warning
    (tmp_path / "cfg" / "old.yaml").write_text("stage: pretrain\ndataset: d\nmodel: cfg/models/m.yaml\n")
    assert load_stage_config("cfg/old.yaml").model == "cfg/models/m.yaml"
    assert "relative to the config's own directory" in caplog.text


# -- items 3 and 4: stage/checkpoint compatibility on the driver, worker errors, stdout, Ctrl-C ------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local):
    """A small version of studio captures and photos (built with Ray, as `pippo data build` does)."""
    from dataprep.build import run_build
    from dataprep.build_config import BuildConfig, ShardLimits, Source
    from dataprep.synth import synth_capture, synth_images

    root = tmp_path_factory.mktemp("driver_data")
    synth_capture(root / "captures" / "cap0", cameras=4, frames=4, height=96, width=64, seed=1)
    synth_images(root / "photos", count=6, seed=3, person_fraction=1.0)
    uri = str(root / "store" / "ds")
    cfg = BuildConfig(dataset=uri, sources=[Source("captures", str(root / "captures")),
                                            Source("images", str(root / "photos"))],
                      resolution=64, plucker_stride=8, face_crop=False, shard=ShardLimits(max_samples=8),
                      partitions=1)
    return f"{uri}@{run_build(cfg, {})}"
