"""Hostile checkpoint metadata and configs (issue 15, items 6, 8 and 9), through the real commands
in this process: a run directory written by someone else (its model.json, run.json), a config
override pointing at a device or a FIFO, names that would leave their root. Each is refused with
one `pippo: error:` line and exit 2, and nothing is fetched or written outside its root."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from support import refused, crafted_run, sample_argv  # shared with this file's other half

PIXEL = {"space": "pixel", "latent_channels": 3, "vae_downsample": 1, "patch_size": 4, "resolution": 16,
         "dim": 32, "depth": 1, "heads": 1, "camera_hidden": 16, "max_views": 8, "siren_channels": [4],
         "camera_mlp": False, "control_mlp": False}



@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "me.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path



@pytest.mark.parametrize("bad, says", [
    ({"dim": 10 ** 9}, "dim must be an integer in [1, 16384]"),
    ({"resolution": -16}, "resolution must be an integer"),
    ({"depth": 10 ** 6}, "depth must be an integer"),
    ({"dim": 16384, "heads": 16, "depth": 512}, "B parameters"),
    ({"max_views": "9" * 30}, "max_views"),
    ({"mlp_ratio": float("inf")}, "mlp_ratio"),
    ({"siren_channels": [10 ** 7]}, "siren_channels"),
    ({"__class__": "x"}, "unknown key '__class__'"),
])
def test_sample_refuses_huge_or_negative_model_json(tmp_path, photo, bad, says):
    run = crafted_run(tmp_path / "run", {**PIXEL, **bad}, weights=False)
    refused(sample_argv(run, photo, tmp_path / "out.gif"), "model.json", says)
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("data, says", [({"resolution": 10 ** 9}, "data.resolution"),
                                        ({"views": -3}, "data.views"),
                                        ({"views": "lots"}, "data.views")])
def test_sample_refuses_huge_or_negative_run_json(tmp_path, photo, data, says):
    run = crafted_run(tmp_path / "run", PIXEL, {"mlflow_run_id": "x", "stage": "pretrain", "config": {"data": data}})
    refused(sample_argv(run, photo, tmp_path / "out.gif"), says)
    assert not list(tmp_path.glob("out*"))


def test_sample_refuses_a_fifo_or_device_run_json(tmp_path, photo):
    run = crafted_run(tmp_path / "run", PIXEL)
    os.mkfifo(run / "run.json")                 # opening it would block the command forever
    refused(sample_argv(run, photo, tmp_path / "out.gif"), "run.json", "not a regular file")
    (run / "final" / "model.json").unlink()
    (run / "final" / "model.json").symlink_to("/dev/zero")
    refused(sample_argv(run, photo, tmp_path / "out.gif"), "model.json", "not a regular file")


def test_train_reads_only_regular_capped_deepspeed_configs(tmp_path):
    """`deepspeed=/dev/zero` (or a FIFO, or a huge file) is one line on the driver, at once."""
    fifo = tmp_path / "ds.fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.json"
    huge.write_bytes(b"{" + b" " * (2 << 20) + b"}")
    base = ["train", "configs/stages/pretrain.yaml", f"dataset={tmp_path}/ds", "vae_standin_seed=0"]
    for target, says in (("/dev/zero", "not a regular file"), (str(fifo), "not a regular file"),
                         (str(huge), "larger than"), (str(tmp_path / "missing.json"), "No such file")):
        refused([*base, f"deepspeed={target}", "--local"], "deepspeed", says)
    (tmp_path / "list.json").write_text("[1, 2]")
    refused([*base, f"deepspeed={tmp_path / 'list.json'}", "--local"], "a DeepSpeed config is a JSON object")


def test_run_name_cannot_leave_the_checkpoint_root(tmp_path):
    root = tmp_path / "store" / "checkpoints"
    for name in ("../../escaped", "/abs/run", "a/b", "..", ".hidden"):
        refused(["train", "configs/stages/pretrain.yaml", f"dataset={tmp_path}/ds", f"run_name={name}",
                 f"checkpoint.root={root}", "--local"], "invalid run_name")
    assert not list(tmp_path.rglob("*"))                         # nothing written anywhere


def test_pipeline_step_names_cannot_leave_the_store_or_workdir(tmp_path):
    """A step name is a path segment of its records ({store}/pipelines/{name}/steps/{step}/) and of
    synth outputs ({workdir}/{name}/{step}-...): '../..' must not reach outside either."""
    for name, steps in (("demo", {"../../../evil": {"kind": "synth", "params": {"captures": 1}}}),
                        ("demo", {"a/b": {"kind": "synth"}}),
                        ("..", {"data": {"kind": "synth"}})):
        config = tmp_path / "p.yaml"
        config.write_text(json.dumps({"name": name, "steps": steps, "store": str(tmp_path / "store"),
                                      "workdir": str(tmp_path / "work")}))
        line = refused(["pipeline", "run", str(config)])
        assert "invalid step name" in line or "invalid pipeline name" in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["p.yaml"]
