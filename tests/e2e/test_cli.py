"""The `pippo` console script (SPEC §2): help, exit codes, one-line errors, JSON on stdout."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dataprep.studio.capture import Capture


def pippo(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"pippo {args} exited {proc.returncode}: {proc.stderr}")
    return proc


@pytest.mark.parametrize("cmd", [[], ["data"], ["data", "synth-captures"], ["data", "inspect"],
                                 ["data", "build"], ["train"], ["pipeline", "run"], ["submit"],
                                 ["compare"], ["sample"], ["eval", "reprojection"], ["model", "info"]])
def test_every_command_has_help(cmd):
    out = pippo(*cmd, "--help").stdout
    assert "usage: pippo" in out and len(out.splitlines()) > 3


def test_synth_then_inspect_json_and_preview(tmp_path):
    pippo("data", "synth-captures", tmp_path / "caps", "--captures", 2, "--cameras", 3, "--frames", 2,
          "--height", 64, "--width", 48, "--seed", 1)
    caps = sorted((tmp_path / "caps").iterdir())
    assert len(caps) == 2
    proc = pippo("data", "inspect", caps[0], "--json", "--preview", tmp_path / "sheet.png")
    info = json.loads(proc.stdout)              # stdout holds exactly one JSON document
    assert info["units"] == "m" and info["frames"] == [0, 10] and len(info["cameras"]) == 3
    cap = Capture(str(caps[0]))
    for c in info["cameras"]:
        cam = cap.camera(c["camera_id"])
        np.testing.assert_allclose(c["t"], cam.t)
        np.testing.assert_allclose(c["center"], -cam.R.T @ cam.t)
        assert 1.0 < np.linalg.norm(c["center"]) < 5.0          # metres, not millimetres
        assert (c["height"], c["width"]) == (64, 48)
    sheet = np.asarray(Image.open(tmp_path / "sheet.png"))
    assert sheet.shape[0] > 64 and sheet.std() > 10


def test_bad_capture_is_one_line_on_stderr_and_nonzero(tmp_path):
    (tmp_path / "cap").mkdir()
    (tmp_path / "cap" / "camera_calibration.json").write_text("{not json")
    proc = pippo("data", "inspect", tmp_path / "cap", check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "camera_calibration.json is not valid JSON" in lines[0]


def test_bad_config_is_one_line_on_stderr(tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("nonsense_key: 1\n")
    proc = pippo("model", "info", cfg, check=False)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1


def test_synth_views_feed_eval_reprojection(tmp_path):
    pippo("data", "synth-views", tmp_path / "gt", "--views", 24, "--height", 256, "--width", 256)
    cams = json.loads((tmp_path / "gt" / "cameras.json").read_text())["views"]
    assert len(cams) == 24 and (tmp_path / "gt" / "view23.png").exists()
    centres = [-np.array(c["R"]).T @ np.array(c["t"]) for c in cams]
    steps = [np.linalg.norm(a - b) for a, b in zip(centres, centres[1:])]
    assert max(steps) - min(steps) < 1e-9                 # an even ring: a turnaround
    result = json.loads(pippo("eval", "reprojection", tmp_path / "gt", "--json").stdout)
    assert result["pairs"] >= 3 and 0 < result["re_pct"] < 0.5     # the metric's noise floor
