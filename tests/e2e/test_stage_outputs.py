"""A stage's outputs are immutable: `pippo train --local` to more steps writes a new final next to
the old one, the same steps hands the existing one back, fewer steps than the run has is one line
(exit 2); run directories of older versions (a single final/) stay readable."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataprep.build.job import run_build
from dataprep.build_config import BuildConfig, Source
from dataprep.studio.synth import synth_images
from pipelines.training.checkpoint import CheckpointError, CheckpointStore, resolve_weights, weights_identity
from support import TINY_MODEL

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def photos_version(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("outputs_data")
    synth_images(root / "photos", count=6, seed=2, person_fraction=1.0)
    uri = str(root / "store" / "ds")
    vid = run_build(BuildConfig(dataset=uri, sources=[Source("images", str(root / "photos"))], resolution=32,
                                plucker_stride=8, face_crop=False), {})
    return f"{uri}@{vid}"


def train(tmp_path, dataset, steps: int):
    argv = [sys.executable, "-m", "pipelines.cli", "train", str(REPO / "configs/stages/pretrain.yaml"),
            f"dataset={dataset}", f"checkpoint.root={tmp_path / 'ckpt'}", f"steps={steps}",
            "checkpoint.every_steps=2", f"model_overrides={json.dumps(TINY_MODEL)}", "data.resolution=32",
            "data.batch_size=2", "data.num_workers=0", "data.holdout_fraction=0", "tracking.sample_every=0",
            "tracking.log_every=1", "tracking.system_metrics=false", "tracking.register_model=null",
            "optim.warmup_steps=1", "--local"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONPATH": str(REPO)}
    start = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    return proc, time.time() - start


def files(final_url: str) -> dict:
    path = Path(final_url.removeprefix("file://"))
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_training_further_writes_a_new_final_and_fewer_steps_is_one_line(tmp_path, photos_version):
    proc, _ = train(tmp_path, photos_version, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stdout.strip().splitlines()[-1]
    assert first.endswith("/final-step_00000002"), first
    before = files(first)
    run_dir = first.rsplit("/", 1)[0]

    proc, _ = train(tmp_path, photos_version, 4)            # the same run (steps are not in its name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = proc.stdout.strip().splitlines()[-1]
    assert second == f"{run_dir}/final-step_00000004"
    assert files(first) == before                          # the 2-step output is untouched
    assert json.loads(before["info.json"])["step"] == 2
    assert resolve_weights(run_dir)[0] == f"{second}/model.safetensors"   # a run dir: its newest final
    assert weights_identity(first) != weights_identity(second)

    proc, _ = train(tmp_path, photos_version, 2)            # exactly an output it has: handed back
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == first and files(first) == before

    proc, took = train(tmp_path, photos_version, 3)         # fewer steps than the run has, no such output
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("pippo: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "already trained to step 4" in errors[0] and "steps=3" in errors[0]
    assert not (Path(run_dir.removeprefix("file://")) / "final-step_00000003").exists()
    assert took < 60, f"fewer steps -> error line in {took:.1f} s"   # refused before any training

    with pytest.raises(CheckpointError, match="immutable"):   # a complete final is never rewritten
        CheckpointStore(run_dir).write_final({}, None, {}, {}, 4)
