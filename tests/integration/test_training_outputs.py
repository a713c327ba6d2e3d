"""What a training run leaves behind (issue 16, items 7 and 10).

DeepSpeed's own tools read our checkpoints: `python -m deepspeed.utils.zero_to_fp32 <step dir> out`,
exactly as a user types it (no --tag), works on a step directory a real training run saved, in the
shipped environment (huggingface_hub installed). A Ray Train run with a remote store leaves nothing
in the working directory (Ray Train's storage_path was ./.pippo/ray_results)."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from pipelines.training.checkpoint import DS_LATEST, DS_TAG, CheckpointStore, load_safetensors
from pipelines.training.launcher import run_stage
from support import stage_cfg

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_to_fp32_reads_a_saved_step_directory(small_version, tmp_path, fresh_mlflow, zero):
    ref = small_version.ref
    cfg = stage_cfg("pretrain", ref, tmp_path / "ck", steps=2, deepspeed=f"configs/deepspeed/zero{zero}.json",
                    **{"resources.ray": False, "tracking.sample_every": 0})
    summary = run_stage(cfg)
    store = CheckpointStore(summary["run_uri"])
    step = store.latest()["dir"]
    step_dir = store.path(step)
    assert open(os.path.join(step_dir, DS_LATEST)).read() == DS_TAG

    out = tmp_path / "fp32"
    proc = subprocess.run([sys.executable, "-m", "deepspeed.utils.zero_to_fp32", step_dir, str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The tool writes a torch pickle; weights_only=True is the loader that runs no code.
    converted = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    # DeepSpeed's engine wraps the model in the training module (its attribute `model`)
    converted = {k.removeprefix("model."): v for k, v in converted.items() if k.startswith("model.")}
    # the step's final holds the trained (non-EMA) weights of the same last step
    trained = load_safetensors(store.url(store.final_at(2), "model_raw.safetensors"))
    assert set(converted) == set(trained)
    for name, value in trained.items():
        assert torch.equal(converted[name].to(value.dtype), value), name


def test_ray_train_run_with_a_remote_store_leaves_nothing_in_the_cwd(small_version, tmp_path, fresh_mlflow,
                                                                     s3_server, monkeypatch):
    import fsspec

    fsspec.filesystem("s3").mkdirs("ckpt-cwd", exist_ok=True)
    ref = small_version.ref
    cfg = stage_cfg("pretrain", ref, "s3://ckpt-cwd/runs", steps=1, workers=1, **{"tracking.sample_every": 0},
                    model=str(ROOT / "configs/models/test.yaml"), deepspeed=str(ROOT / "configs/deepspeed/zero2.json"))
    monkeypatch.delenv("PIPPO_RAY_RESULTS", raising=False)
    before = set(Path(tempfile.gettempdir()).glob("pippo-ray-train-*"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    summary = run_stage(cfg)
    assert summary["step"] == 1 and summary["checkpoint"].startswith("s3://")
    assert list(cwd.iterdir()) == []                            # no ./.pippo/ray_results
    assert set(Path(tempfile.gettempdir()).glob("pippo-ray-train-*")) <= before   # its scratch is gone
