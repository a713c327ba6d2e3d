"""Config paths resolve against the config file, not the working directory (the driver's
fail-fast checks through the real command: tests/e2e/test_driver_checks.py)."""

from pathlib import Path


REPO = Path(__file__).resolve().parents[2]




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
