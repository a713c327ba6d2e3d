"""`pippo compare` and `pippo sample` on real runs: a small dataset version, pretrain -> mid -> post
trained with the real trainer (`pippo train ... --local`, pixel-space test preset at 32 px) under
one pipeline parent run in a real sqlite MLflow store, plus an eval child run; then the comparison
table/plots and turnarounds of a real photo (scikit-image's astronaut) from every stage."""
import contextlib
import io
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines import cli
from support import SMALL_MODEL

pytestmark = pytest.mark.slow

EXPERIMENT = "cmp-test"
TRAIN_VIEWS = {"pretrain": 1, "mid": 2, "post": 2}


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """pippo ARGV in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('cmp_mlflow')}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def train(stage: str, dataset: str, root, parent: str | None, init_from: str | None, **extra) -> dict:
    data = {"views": TRAIN_VIEWS[stage], "batch_size": 2, "resolution": 32, "num_workers": 0}
    if stage == "post":
        data["face_views"] = 1
    over = {"dataset": dataset, "checkpoint.root": str(root), "steps": 3, "checkpoint.every_steps": 3,
            "tracking.log_every": 1, "tracking.sample_every": 0, "tracking.system_metrics": False,
            "tracking.experiment": EXPERIMENT, "tracking.parent_run_id": parent, "tracking.register_model": None,
            "init_from": init_from, "model_overrides": SMALL_MODEL, "optim.warmup_steps": 1,
            **{f"data.{k}": v for k, v in data.items()}, **extra}
    argv = ["train", f"configs/stages/{stage}.yaml", *(f"{k}={json.dumps(v)}" for k, v in over.items()),
            "--local", "--json"]
    code, out, err = run_cli(argv)
    assert code == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(small_version, tracking, tmp_path_factory):
    """pipeline parent -> pretrain, mid, post, eval children; and one more stand-alone pretrain run
    with another learning rate (two lines in the pretrain panel, a param that differs)."""
    from pipelines.tracking import RunTracker

    ref, vid = small_version.ref, small_version.id
    root = tmp_path_factory.mktemp("cmp_ckpt")
    parent = RunTracker(EXPERIMENT, "demo", step_tag="pipeline", system_metrics=False,
                        tags={"pippo.pipeline": "demo"})
    runs, prev = {}, None
    for stage in ("pretrain", "mid", "post"):
        runs[stage] = train(stage, ref, root, parent.run_id, prev)
        prev = runs[stage]["run_uri"]
    # eval runs of mid and post (pippo.eval_stage, as run_eval tags them): the stage table
    with RunTracker(EXPERIMENT, "demo/eval_mid", step_tag="eval", parent_run_id=parent.run_id,
                    system_metrics=False, tags={"pippo.eval_stage": "mid"}) as ev_mid:
        ev_mid.log_metrics({"eval/re_pct": 2.5, "eval/psnr": 15.0, "eval/psnr_wrong_camera": 12.0}, step=0)
    with RunTracker(EXPERIMENT, "demo/eval", step_tag="eval", parent_run_id=parent.run_id,
                    system_metrics=False, tags={"pippo.eval_stage": "post"}) as ev:
        ev.log_metrics({"eval/re_pct": 1.25, "eval/psnr": 17.5, "eval/ssim": 0.61}, step=0)
    parent.end("FINISHED")
    runs["pretrain_lr"] = train("pretrain", ref, root, None, None, **{"optim.lr": 5e-4})
    return {"runs": runs, "parent": parent.run_id, "eval": ev.run_id, "eval_mid": ev_mid.run_id, "version": vid}


# -- compare ----------------------------------------------------------------------------------------

def test_compare_json(trained, tmp_path):
    code, out, err = run_cli(["compare", "--experiment", EXPERIMENT, "--out", str(tmp_path / "plots"), "--json"])
    assert code == 0, err
    doc = json.loads(out)                                    # stdout is exactly one JSON document
    runs = {r["run_id"]: r for r in doc["runs"]}
    ids = {k: v["mlflow_run_id"] for k, v in trained["runs"].items()}
    assert set(runs) == {*ids.values(), trained["parent"], trained["eval"], trained["eval_mid"]}
    assert [runs[ids[s]]["step"] for s in ("pretrain", "mid", "post")] == ["pretrain", "mid", "post"]
    assert runs[trained["parent"]]["step"] == "pipeline" and runs[trained["eval"]]["step"] == "eval"
    # parent/child structure: the four steps under the parent, the stand-alone run at the root
    parent = runs[trained["parent"]]
    assert set(parent["children"]) == {ids["pretrain"], ids["mid"], ids["post"], trained["eval"], trained["eval_mid"]}
    assert parent["depth"] == 0 and runs[ids["post"]]["depth"] == 1 and runs[ids["pretrain_lr"]]["depth"] == 0
    assert runs[ids["mid"]]["parent_run_id"] == trained["parent"]
    # dataset version, final metrics, checkpoint tag
    for key in ids:
        r = runs[ids[key]]
        assert r["dataset_versions"] == [trained["version"]] and r["status"] == "FINISHED"
        assert np.isfinite(r["metrics"]["train/loss"])
        assert r["checkpoint"] == trained["runs"][key]["checkpoint"]
    assert runs[trained["eval"]]["metrics"] == {"eval/re_pct": 1.25, "eval/psnr": 17.5, "eval/ssim": 0.61}
    # the stages' eval metrics side by side, in training order
    assert list(doc["stage_evals"]) == ["mid", "post"]
    assert doc["stage_evals"]["mid"] == {"run_id": trained["eval_mid"], "eval/re_pct": 2.5, "eval/psnr": 15.0,
                                         "eval/psnr_wrong_camera": 12.0}
    assert doc["stage_evals"]["post"]["eval/psnr"] == 17.5
    # only the params that differ between runs of the same kind of step: the two pretrain runs'
    # learning rate; not what differs by nature between stages (stage, init_from, views)
    diff = doc["differing_params"]
    assert "optim.lr" in diff
    assert not {"stage", "init_from", "data.views", "model.dim", "data.resolution", "seed"} & set(diff)
    assert runs[ids["pretrain_lr"]]["params"]["optim.lr"] != runs[ids["pretrain"]]["params"]["optim.lr"]
    assert runs[trained["parent"]]["params"] == {}
    # the plots are real PNGs
    for name in ("loss", "eval"):
        path = doc["plots"][name]
        assert path and os.path.dirname(path) == str(tmp_path / "plots")
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
            im.verify()


def test_compare_text_and_default_experiment(trained, tmp_path, monkeypatch):
    """No --experiment: the demo's experiment does not exist here, so the most recent one."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["compare"])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"experiment {EXPERIMENT} ")
    header = next(line for line in lines if line.startswith("run "))
    assert "train/loss" in header and "eval/psnr" in header and "checkpoint" in header
    assert "params that differ:" in out and "optim.lr" in out
    table = lines[lines.index("eval metrics by stage (newest eval run of each):") + 1:]
    assert table[0].split() == ["metric", "mid", "post"]
    assert table[2].split() == ["eval/psnr", "15", "17.5"]
    assert next(r for r in table if r.startswith("eval/psnr_wrong_camera")).split() == ["eval/psnr_wrong_camera", "12", "-"]
    assert (tmp_path / "out" / "compare" / "loss_curves.png").is_file()
    assert str(tmp_path / "out" / "compare" / "eval_metrics.png") in lines[-1]


def test_compare_unknown_experiment(tracking, tmp_path):
    """In a fresh process, so that any logging or MLflow chatter on stderr would show."""
    pippo = os.path.join(os.path.dirname(sys.executable), "pippo")
    proc = subprocess.run([pippo, "compare", "--experiment", "no-such-experiment",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "no-such-experiment" in proc.stderr, proc.stderr


# -- sample -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def astronaut(tmp_path_factory):
    """A real photo, not square: skimage's astronaut (512², shipped in the wheel) padded to 4:3."""
    from skimage import data

    rgb = np.pad(data.astronaut(), ((0, 0), (96, 32), (0, 0)), mode="edge")
    path = tmp_path_factory.mktemp("photo") / "astronaut.jpg"
    Image.fromarray(rgb).save(path, quality=92)
    return path


@pytest.mark.parametrize("stage,views,gamma", [("post", 6, 1.0), ("mid", 2, None), ("pretrain", 3, 1.0)])
def test_sample_turnaround(trained, astronaut, tmp_path, stage, views, gamma):
    """GIF (N frames), MP4 (N frames), PNG views + cameras.json in the eval layout; attention
    biasing exactly when N exceeds the views the stage was trained with (post 2, mid 2, pretrain 1)."""
    from pipelines.reprojection import read_views

    out = tmp_path / "turn.gif"
    code, stdout, err = run_cli(["sample", "--checkpoint", trained["runs"][stage]["run_uri"], "--image",
                                 str(astronaut), "--views", str(views), "--out", str(out), "--steps", "3"])
    assert code == 0, err[-2000:]
    assert stdout.strip().splitlines()[-1] == str(out)
    with Image.open(out) as gif:
        assert gif.n_frames == views and gif.size == (32, 32)
    cap = cv2.VideoCapture(str(tmp_path / "turn.mp4"))
    frames = 0
    while cap.read()[0]:
        frames += 1
    assert frames == views
    folder = tmp_path / "turn_views"
    images, cams = read_views(folder)                      # what `pippo eval reprojection` reads
    assert len(images) == views and images[0].shape == (32, 32, 3)
    meta = json.loads((folder / "cameras.json").read_text())["sample"]
    assert meta["stage"] == stage and meta["gamma"] == gamma and meta["views_per_pass"] == views
    # the orbit: one radius, one elevation, every camera looking at the origin
    centres = np.array([-c["R"].T @ c["t"] for c in cams])
    assert np.allclose(np.linalg.norm(centres, axis=1), 2.2)
    assert np.allclose(centres[:, 2], 2.2 * np.sin(np.radians(10.0)))
    for c in cams:
        assert np.allclose(c["K"] @ (c["R"] @ np.zeros(3) + c["t"]) / c["t"][2], [15.5, 15.5, 1.0])
    assert len({tuple(np.round(c, 6)) for c in centres}) == views


def test_sample_bad_inputs(trained, astronaut, tmp_path):
    post = trained["runs"]["post"]["run_uri"]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    for argv in (["--image", str(bad), "--out", str(tmp_path / "a.gif")],
                 ["--image", str(astronaut), "--out", str(tmp_path / "a.gif"), "--resolution", "30"],
                 ["--image", str(astronaut), "--out", str(tmp_path / "a.png")],
                 ["--image", str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "a.gif")]):
        code, out, err = run_cli(["sample", "--checkpoint", post, "--views", "2", "--steps", "1", *argv])
        assert code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(["sample", "--checkpoint", str(tmp_path / "no-run"), "--image", str(astronaut),
                            "--out", str(tmp_path / "a.gif")])
    assert code == 2 and err.startswith("pippo: error: --checkpoint ") and len(err.strip().splitlines()) == 1
