"""Stage outputs on disk: run directories of older versions (a single final/) stay readable and
a train record whose weights changed or vanished is not served (training further through the
real command: tests/e2e/test_stage_outputs.py)."""
import json
import shutil

import pytest

from pipelines.training.checkpoint import CheckpointError, CheckpointStore, resolve_weights, weights_identity


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
