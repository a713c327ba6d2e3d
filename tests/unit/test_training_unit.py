"""A step directory without its completion marker is never loaded
(training runs: tests/integration/test_training.py)."""


from pipelines.training.checkpoint import CheckpointStore


def test_checkpoint_without_marker_is_never_loaded(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    for step in (2, 4):
        store.write_json({"step": step, "world_size": 1, "samples": step}, f"step_{step:08d}", "trainer.json")
    (tmp_path / "run" / "step_00000002" / "COMPLETE").write_text("ok\n")
    assert store.complete_steps() == [2]
    assert store.latest()["step"] == 2                     # no pointer: listing finds the complete one
    store.write_json({"step": 4, "dir": "step_00000004"}, "latest")
    assert store.latest()["step"] == 2                     # a pointer to an unmarked step is ignored
