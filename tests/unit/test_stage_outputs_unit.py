"""A stage's outputs are immutable: `pippo train --local` to more steps writes a new final next to
the old one, the same steps hands the existing one back, fewer steps than the run has is one line
(exit 2); run directories of older versions (a single final/) stay readable."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.training.checkpoint import CheckpointError, CheckpointStore, resolve_weights, weights_identity

REPO = Path(__file__).resolve().parents[2]
MODEL = {"space": "pixel", "latent_channels": 3, "vae_downsample": 1, "patch_size": 4, "resolution": 32,
         "dim": 32, "depth": 1, "heads": 2, "camera_hidden": 32}


def train(tmp_path, dataset, steps: int):
    argv = [sys.executable, "-m", "pipelines.cli", "train", str(REPO / "configs/stages/pretrain.yaml"),
            f"dataset={dataset}", f"checkpoint.root={tmp_path / 'ckpt'}", f"steps={steps}",
            "checkpoint.every_steps=2", f"model_overrides={json.dumps(MODEL)}", "data.resolution=32",
            "data.batch_size=2", "data.num_workers=0", "data.holdout_fraction=0", "tracking.sample_every=0",
            "tracking.log_every=1", "tracking.system_metrics=false", "tracking.register_model=null",
            "optim.warmup_steps=1", "--local"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONPATH": str(REPO)}
    start = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    return proc, time.time() - start


def test_a_run_of_an_older_version_stays_readable(tmp_path):
    """A run directory with one `final/` (the layout before finals were named by step)."""
    from safetensors.torch import save_file
    import torch

    run = tmp_path / "pretrain-0123456789"
    (run / "final").mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(run / "final" / "model.safetensors"))
    (run / "final" / "model.json").write_text("{}")
    (run / "final" / "info.json").write_text(json.dumps({"step": 40}))
    (run / "final" / "COMPLETE").write_text("ok\n")
    store = CheckpointStore(str(run))
    assert store.final_at(40) == "final"
    assert resolve_weights(str(run))[0].endswith("/final/model.safetensors")
    # no recorded digest: the bytes are hashed
    import hashlib
    assert weights_identity(str(run)) == hashlib.sha256((run / "final" / "model.safetensors").read_bytes()).hexdigest()
    shutil.copytree(run / "final", run / "final-step_00000060")     # trained further by this version
    (run / "final-step_00000060" / "info.json").write_text(json.dumps({"step": 60}))
    assert sorted(store.finals()) == [40, 60]
    assert resolve_weights(str(run))[0].endswith("/final-step_00000060/model.safetensors")
    store.check_steps(40, {"step": 60})                # that output exists: no error
    with pytest.raises(CheckpointError, match="already trained to step 60"):
        store.check_steps(50, {"step": 60})


def test_a_train_record_whose_weights_changed_or_vanished_is_not_served(tmp_path):
    """The workflow's cache: a train step's record is served only while its checkpoint holds the
    weights it recorded, and a downstream key moves with the upstream weights' digest."""
    import torch

    from pipelines.workflow.config import PipelineConfig, StepConfig
    from pipelines.workflow.dag import Workflow

    def workflow():
        steps = {"pretrain": StepConfig(kind="train", config="unused.yaml"),
                 "mid": StepConfig(kind="train", config="unused.yaml", overrides={"init_from": "${steps.pretrain}"})}
        return Workflow(PipelineConfig(name="t", steps=steps, store=str(tmp_path / "store")))

    store = CheckpointStore(str(tmp_path / "run"))
    url = store.write_final({"w": torch.ones(4)}, None, {}, {"step": 2}, 2)
    wf = workflow()
    record = {"kind": "train", "output": url, "output_identity": wf.identity("pretrain", url)}
    assert wf._still_valid("pretrain", record)
    key = wf.key("mid", {}, {"pretrain": record["output_identity"]})

    from safetensors.torch import save_file
    save_file({"w": torch.zeros(8)}, str(tmp_path / "run" / "final-step_00000002" / "model.safetensors"))
    wf = workflow()                                       # a new invocation: nothing memoised
    assert not wf._still_valid("pretrain", record)
    assert wf.key("mid", {}, {"pretrain": wf.identity("pretrain", url)}) != key
    shutil.rmtree(tmp_path / "run" / "final-step_00000002")
    assert not workflow()._still_valid("pretrain", record)
