"""Checkpoints are untrusted input: nothing in a run directory can make a resume run code, hang,
or load files from outside the run (issue: resume unpickled the run's DeepSpeed files)."""

import json
import os
import stat

import pytest

from pipelines.training.checkpoint import CheckpointError, CheckpointStore, load_safetensors, node_scratch
from pipelines.training.safe_load import UnsafeCheckpointError, verify_tree


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


def test_weights_cache_is_private_and_verified(tmp_path):
    """The per-user cache of remote weights (VAE directories): a cache root others can write is
    refused; a cached copy whose files changed after the fetch (a planted file) is fetched again."""
    import fsspec

    from pippo_common.errors import UserError
    from pipelines.weights import fetch_directory

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
