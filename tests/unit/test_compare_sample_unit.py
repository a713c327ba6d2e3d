"""`pippo compare` and `pippo sample` on real runs: a small dataset version, pretrain -> mid -> post
trained with the real trainer (`pippo train ... --local`, pixel-space test preset at 32 px) under
one pipeline parent run in a real sqlite MLflow store, plus an eval child run; then the comparison
table/plots and turnarounds of a real photo (scikit-image's astronaut) from every stage."""
import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from pipelines import cli


EXPERIMENT = "cmp-test"
MODEL = {"space": "pixel", "latent_channels": 3, "vae_downsample": 1, "patch_size": 4, "resolution": 32,
         "dim": 64, "depth": 2, "heads": 2, "camera_hidden": 64}
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


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local):
    """One capture with face crops (mid/post) and a few photos (pretrain)."""
    from dataprep.build import run_build
    from dataprep.build_config import BuildConfig, Source
    from dataprep.synth import synth_capture, synth_images

    root = tmp_path_factory.mktemp("cmp_data")
    synth_capture(root / "captures" / "cap0", cameras=6, frames=3, height=96, width=64, seed=21)
    synth_images(root / "photos", count=6, seed=4, person_fraction=1.0)
    uri = str(root / "store" / "ds")
    cfg = BuildConfig(dataset=uri, sources=[Source("captures", str(root / "captures")),
                                            Source("images", str(root / "photos"))],
                      resolution=64, plucker_stride=8, face_crop=True, face_resolution=32)
    vid = run_build(cfg, {})
    return f"{uri}@{vid}", vid


def train(stage: str, dataset: str, root, parent: str | None, init_from: str | None, **extra) -> dict:
    data = {"views": TRAIN_VIEWS[stage], "batch_size": 2, "resolution": 32, "num_workers": 0}
    if stage == "post":
        data["face_views"] = 1
    over = {"dataset": dataset, "checkpoint.root": str(root), "steps": 3, "checkpoint.every_steps": 3,
            "tracking.log_every": 1, "tracking.sample_every": 0, "tracking.system_metrics": False,
            "tracking.experiment": EXPERIMENT, "tracking.parent_run_id": parent, "tracking.register_model": None,
            "init_from": init_from, "model_overrides": MODEL, "optim.warmup_steps": 1,
            **{f"data.{k}": v for k, v in data.items()}, **extra}
    argv = ["train", f"configs/stages/{stage}.yaml", *(f"{k}={json.dumps(v)}" for k, v in over.items()),
            "--local", "--json"]
    code, out, err = run_cli(argv)
    assert code == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(dataset, tracking, tmp_path_factory):
    """pipeline parent -> pretrain, mid, post, eval children; and one more stand-alone pretrain run
    with another learning rate (two lines in the pretrain panel, a param that differs)."""
    from pipelines.training.tracking import RunTracker

    ref, vid = dataset
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


# -- sample -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def astronaut(tmp_path_factory):
    """A real photo, not square: skimage's astronaut (512², shipped in the wheel) padded to 4:3."""
    from skimage import data

    rgb = np.pad(data.astronaut(), ((0, 0), (96, 32), (0, 0)), mode="edge")
    path = tmp_path_factory.mktemp("photo") / "astronaut.jpg"
    Image.fromarray(rgb).save(path, quality=92)
    return path


def test_person_square():
    from dataprep.detection import square_around

    # a standing person in a landscape photo: a square around the box, margin included, inside
    assert square_around(480, 640, (300, 100, 360, 220), margin=0.25) == (240, 70, 180)
    # near the border: shifted in, never padded; too large: shrunk to the short side
    assert square_around(480, 640, (600, 10, 630, 70), margin=0.25) == (550, 0, 90)
    assert square_around(480, 640, (100, 0, 400, 470), margin=0.25) == (10, 0, 480)


def test_reference_crop_around_the_largest_person():
    """The detector's boxes are what matters here: a stub backend behind the same interface."""
    from dataprep.detection import Detections, Found
    from pipelines import sample

    class Stub:
        def __init__(self, persons, best=None):
            self.persons, self.best = persons, best

        def detect(self, images):
            return [Detections("stub", list(self.persons), best_person=self.best) for _ in images]

    rgb = np.zeros((300, 400, 3), np.uint8)
    stub = Stub([Found([10, 10, 30, 50], 2.0), Found([250, 50, 330, 250], 0.5)])
    crop, info = sample.reference_crop(rgb, 32, detector=stub)
    assert crop.shape == (32, 32, 3) and info["how"] == "person" and info["box"] == [120, 10, 280]
    assert info["score"] == 0.5
    crop, info = sample.reference_crop(rgb, 32, detector=Stub([], best=-1.25))
    assert crop.shape == (32, 32, 3) and info == {
        "how": "centre", "box": [50, 0, 300],
        "reason": "no person detected (stub): best score -1.250 < min score 0"}


def test_reference_crop_uses_the_builds_detector_on_a_real_photo(tmp_path):
    """No stub: the default backend (OpenCV HOG, which the pinned OpenCV must ship) finds the
    rendered person of a synthetic photo and the crop is around it."""
    from dataprep.photos import decode_photo
    from dataprep.synth import synth_images
    from pipelines import sample

    path = synth_images(tmp_path, count=1, seed=9, person_fraction=1.0)[0]
    rgb = decode_photo(path.read_bytes(), 10**8).rgb
    crop, info = sample.reference_crop(rgb, 64)
    assert info["how"] == "person" and info["detector"] == "opencv" and info["score"] > 0
    x0, y0, side = info["box"]
    px0, py0, px1, py1 = info["person"]
    assert x0 <= px0 and y0 <= py0 and px1 <= x0 + side and py1 <= y0 + side


def test_sample_views_in_chunks_when_out_of_memory(monkeypatch):
    """A joint pass that does not fit is halved until it does; gamma only where a pass is longer
    than a training sample; more views than the per-view table holds: balanced passes."""
    import types

    import torch

    import pippo_model.sampler as sampler
    from pipelines import sample
    from pippo_model.config import ModelConfig

    passes = []

    def fake_ddim(model, schedule, cond, shape, **kw):
        passes.append((shape[1], kw["gamma"], cond["cameras"].shape[1]))
        if shape[1] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (stub)")
        return torch.zeros(shape)

    monkeypatch.setattr(sampler, "ddim_sample", fake_ddim)
    model = types.SimpleNamespace(cfg=ModelConfig(**MODEL, max_views=8).for_stage("mid"))
    cond = {"reference": torch.zeros(1, 3, 32, 32), "cameras": torch.zeros(1, 10, 16)}
    kw = dict(steps=1, guidance=1.0, seed=0, gamma=1.0, n_train=3 * 64, device=torch.device("cpu"))
    x, info = sample.sample_views(model, cond, 10, 32, **kw)
    assert x.shape == (10, 3, 32, 32) and info == {"chunk": 3, "gamma": 1.0}
    assert [p[0] for p in passes] == [5, 3, 3, 3, 1]          # 10 > max_views: 5 + 5 first, then halved
    assert passes[-1] == (1, None, 1) and passes[1] == (3, 1.0, 3)
