"""The evaluation step on real tiny checkpoints: run_stage trains each stage for a few steps on a
small version (as tests/test_training.py does), run_eval measures it on the held-out samples at
their true cameras and logs one MLflow run (SPEC §7)."""
import json
import math

import mlflow
import pytest
import torch

from dataprep.build.job import run_build
from dataprep.build_config import BuildConfig, ShardLimits, Source
from dataprep.studio.synth import synth_capture, synth_images
from pippo_common.config import ConfigError, from_dict
from pipelines.evaluation import EvalConfig, run_eval
from pipelines.training.launcher import load_stage_config, run_stage
from support import SMALL_MODEL

pytestmark = pytest.mark.slow
torch.set_num_threads(2)

# patch 8: 128 px eval views are 16x16 tokens, so 8 views + the reference stay cheap on a CPU
MODEL = {**SMALL_MODEL, "patch_size": 8, "resolution": 64}
EVAL = dict(samples=3, views=8, resolution=128, steps=3, guidance=2.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local):
    """16 dome cameras (neighbours close enough for the RE to find pairs among 8 of them) at 128 px,
    face crops, plus photos for pretrain."""
    root = tmp_path_factory.mktemp("eval_data")
    for k in range(2):
        synth_capture(root / "captures" / f"cap{k}", cameras=16, frames=6, height=192, width=128, seed=10 + k)
    synth_images(root / "photos", count=16, seed=3, person_fraction=1.0)
    uri = str(root / "store" / "ds")
    cfg = BuildConfig(dataset=uri, sources=[Source("captures", str(root / "captures")),
                                            Source("images", str(root / "photos"))],
                      resolution=128, plucker_stride=8, face_crop=True, face_resolution=64,
                      shard=ShardLimits(max_samples=5), partitions=2)
    vid = run_build(cfg, {})
    return f"{uri}@{vid}", holdout_fraction(uri, vid)


def holdout_fraction(uri, vid):
    """The smallest fraction that holds out 3 studio frames and 2 photos (keys hash their input's
    path, so which samples a fraction holds out changes with the temporary directory)."""
    from dataprep.loader import held_out
    from dataprep.store.core import DatasetStore

    store = DatasetStore(uri)
    rows = [row for shard in store.version_shards(store.resolve(vid))
            for row in zip(*[store.shard_index(shard).column(c).to_pylist() for c in ("key", "kind")])]
    for fraction in (0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6):
        held = [kind for k, kind in rows if held_out(k, fraction)]
        if held.count("studio") >= 3 and held.count("image") >= 2:
            return fraction
    pytest.fail("no holdout fraction holds out enough samples")


@pytest.fixture(scope="module", autouse=True)
def _tracking(mlflow_uri):
    """The session's MLflow store, exported for this module's runs (in-process and Ray workers)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        mlflow.set_tracking_uri(mlflow_uri)
        yield


@pytest.fixture(scope="module")
def checkpoints(dataset, tmp_path_factory, mlflow_uri):
    """stage -> final/ URI of a 2-step run of that stage (in this process, no Ray Train)."""
    dataset, holdout = dataset
    root = tmp_path_factory.mktemp("ckpt")
    data = {"pretrain": {"views": 1, "batch_size": 2}, "mid": {"views": 2, "batch_size": 2},
            "post": {"views": 2, "batch_size": 2, "face_views": 1}}
    out = {}
    for stage in ("pretrain", "mid", "post"):
        overrides = [f"dataset={dataset}", f"checkpoint.root={root}", "steps=2", "checkpoint.every_steps=2",
                     "tracking.sample_every=0", "tracking.system_metrics=false", "tracking.register_model=null",
                     f"tracking.experiment=train-{stage}", f"model_overrides={json.dumps(MODEL)}",
                     "data.resolution=64", "data.num_workers=0", f"data.holdout_fraction={holdout}",
                     "resources.ray=false", "optim.warmup_steps=1",
                     *[f"data.{k}={v}" for k, v in data[stage].items()]]
        out[stage] = run_stage(load_stage_config(f"configs/stages/{stage}.yaml", overrides))["checkpoint"]
    return out


def eval_cfg(checkpoint, dataset, **kw):
    ref, holdout = dataset
    return EvalConfig(checkpoint=checkpoint, dataset=ref, experiment="test-eval",
                      **{"holdout_fraction": holdout, **EVAL, **kw})


def parent_run():
    """A pipeline's parent run (created like every pippo run: artifacts beside the test's db)."""
    from pipelines.tracking import RunTracker

    with RunTracker("test-eval", "pipeline", step_tag="pipeline", system_metrics=False) as run:
        return run.run_id


@pytest.mark.parametrize("stage", ["mid", "post"])
def test_mid_and_post_metrics_and_the_mlflow_run(stage, checkpoints, dataset, mlflow_uri):
    parent = parent_run()
    out = run_eval(eval_cfg(checkpoints[stage], dataset, face_views=1 if stage == "post" else 0), parent_run_id=parent)
    assert out["stage"] == stage and out["samples"] == EVAL["samples"]
    for key in ("eval/psnr", "eval/ssim", "eval/re_pct_gt", "eval/re_pairs", "eval/re_pairs_gt"):
        assert math.isfinite(out[key]), (key, out)
    # ground truth at its true cameras: pairs are found and the error is the metric's noise floor
    # (~0.2-0.5 % at 128 px: under a pixel)
    assert out["eval/re_pairs_gt"] >= 1 and out["eval/re_pct_gt"] < 1.0, out
    # an untrained model's views: measured (finite) or, with no significant pair, NaN -- never a guess
    assert math.isfinite(out["eval/re_pct"]) or out["eval/re_pairs"] == 0, out
    assert -1.0 <= out["eval/ssim"] <= 1.0 and out["eval/psnr"] > 0
    assert "eval/fid" not in out                          # 16 images < fid_min_samples

    run = mlflow.MlflowClient().get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["pippo.step"] == "eval" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["pippo.checkpoint"] == checkpoints[stage]
    assert run.data.params["stage"] == stage and run.data.params["holdout_fraction"] == str(dataset[1])
    assert run.data.params["views"] == "8" and run.data.params["checkpoint"] == checkpoints[stage]
    logged = run.data.metrics
    assert set(logged) == {k for k in out if k.startswith("eval/")}           # NaN included
    assert logged["eval/psnr"] == pytest.approx(out["eval/psnr"])
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [dataset[0].split("@")[1]]
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(out["run_id"], "eval")]
    assert arts == ["eval/contact_sheet.png"]
    found = mlflow.search_runs(experiment_names=["test-eval"], output_format="list",
                               filter_string=f"tags.`pippo.step` = 'eval' and tags.`mlflow.parentRunId` = '{parent}'")
    assert [r.info.run_id for r in found] == [out["run_id"]]


def test_generated_views_are_measured_at_their_true_cameras(checkpoints, dataset, mlflow_uri, monkeypatch):
    """A 'model' that returns the ground truth scores the ground truth's RE exactly (the generated
    views are measured under the same cameras, in the same order), SSIM 1 and the PSNR ceiling;
    shuffling the generated views' order breaks their geometry and the RE rises."""
    import pipelines.evaluation as ev

    monkeypatch.setattr(ev, "generate", lambda model, model_cfg, pixel, cfg, device: pixel["views"].clone())
    perfect = run_eval(eval_cfg(checkpoints["mid"], dataset))
    assert perfect["eval/re_pct"] == perfect["eval/re_pct_gt"] and perfect["eval/re_pairs"] >= 2
    assert perfect["eval/ssim"] == pytest.approx(1.0) and perfect["eval/psnr"] > 100

    def scrambled(model, model_cfg, pixel, cfg, device):
        # even cameras first, then odd ones: unlike a roll, this is no symmetry of a camera ring
        n = pixel["views"].shape[1]
        return pixel["views"][:, list(range(0, n, 2)) + list(range(1, n, 2))]

    monkeypatch.setattr(ev, "generate", scrambled)
    shuffled = run_eval(eval_cfg(checkpoints["mid"], dataset))
    assert shuffled["eval/re_pairs"] == 0 or shuffled["eval/re_pct"] > 3 * perfect["eval/re_pct_gt"], shuffled
    assert shuffled["eval/ssim"] < 0.9


def test_pretrain_gives_psnr_ssim_and_fid_without_re(checkpoints, dataset, mlflow_uri):
    out = run_eval(eval_cfg(checkpoints["pretrain"], dataset, resolution=64, fid_min_samples=2))
    assert out["stage"] == "pretrain"
    assert math.isfinite(out["eval/psnr"]) and math.isfinite(out["eval/ssim"]) and math.isfinite(out["eval/fid"])
    assert not any(k.startswith("eval/re_") for k in out)
    run = mlflow.MlflowClient().get_run(out["run_id"])
    assert "mlflow.parentRunId" not in run.data.tags and run.data.tags["pippo.step"] == "eval"


def test_latent_stage_decodes_with_its_standin_vae(dataset, tmp_path, mlflow_uri):
    """A latent-space stage trained with the seeded stand-in VAE: the eval finds the seed in the
    run's run.json and decodes with the same VAE."""
    ref, holdout = dataset
    latent = {**MODEL, "space": "latent", "latent_channels": 4, "vae_downsample": 8, "patch_size": 2}
    overrides = [f"dataset={ref}", f"checkpoint.root={tmp_path}", "steps=1", "tracking.sample_every=0",
                 "tracking.system_metrics=false", "tracking.register_model=null", "tracking.experiment=train-latent",
                 f"model_overrides={json.dumps(latent)}", "data.resolution=64", "data.num_workers=0",
                 f"data.holdout_fraction={holdout}", "resources.ray=false", "vae_standin_seed=7",
                 "data.views=1", "data.batch_size=2"]
    ckpt = run_stage(load_stage_config("configs/stages/pretrain.yaml", overrides))["checkpoint"]
    out = run_eval(eval_cfg(ckpt, dataset, resolution=64, samples=1))
    assert math.isfinite(out["eval/psnr"]) and math.isfinite(out["eval/ssim"])
    assert mlflow.MlflowClient().get_run(out["run_id"]).data.params["vae_standin_seed"] == "7"


def test_a_holdout_fraction_other_than_the_stages_is_refused(checkpoints, dataset, mlflow_uri):
    with pytest.raises(ValueError, match="holdout_fraction"):
        run_eval(eval_cfg(checkpoints["mid"], dataset, holdout_fraction=0.15))
    with pytest.raises(ConfigError, match="samples"):
        from_dict(EvalConfig, {"checkpoint": "x", "dataset": "y@latest", "samples": 0})


def test_loader_cameras_describe_the_delivered_pixels_of_face_crops(dataset):
    """`_K` of a face crop is the full view's K after the crop and resize: warping the full view by
    K_face K_full^-1 (same camera, so a pixel-to-pixel affine map) reproduces the face crop."""
    import cv2
    import numpy as np

    from dataprep.loader import DataSource, LoaderConfig, TrainingLoader

    ref, holdout = dataset
    batches = [TrainingLoader([DataSource(ref)], "post", LoaderConfig(
        num_workers=0, resolution=128, views=4, face_views=f, holdout_fraction=holdout)).heldout_batch(3)
        for f in (1, 0)]
    face, full = batches
    assert torch.equal(face["_view_index"], full["_view_index"]) and torch.equal(face["_R"], full["_R"])
    checked = 0
    for s, v in zip(*torch.nonzero(face["_face"], as_tuple=True)):
        A = (face["_K"][s, v] @ torch.linalg.inv(full["_K"][s, v])).numpy()
        assert np.allclose(A[2], [0, 0, 1])
        src = ((full["views"][s, v].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.float32)
        want = ((face["views"][s, v].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.float32)
        errors = [np.abs(cv2.warpAffine(src, (A + [[0, 0, dx], [0, 0, 0], [0, 0, 0]])[:2], (128, 128),
                                        flags=cv2.INTER_LINEAR) - want).mean() for dx in (0, 6)]
        assert errors[0] < 6 and errors[0] < 0.4 * errors[1], errors    # aligned; 6 px off is far worse
        checked += 1
    assert checked


def test_wrong_camera_control_turns_every_conditioning_input_and_nothing_else(dataset):
    """wrong_camera_batch: 0° gives the batch's own camera vectors, Plücker maps and anchors back
    (so the control differs from the real eval only by the turn); 90° moves each camera centre a
    quarter turn about the vertical through the head, at the same height and distance, and
    changes the camera vector, Plücker map and anchor of every target."""
    import numpy as np

    from dataprep.loader import DataSource, LoaderConfig, TrainingLoader
    from pipelines.evaluation import wrong_camera_batch

    ref, holdout = dataset
    loader = TrainingLoader([DataSource(ref)], "post", LoaderConfig(
        num_workers=0, resolution=128, views=3, holdout_fraction=holdout, holdout_cameras=0.25))
    pixel = loader.heldout_batch(2)
    axis = [loader.anchor_axis_m(int(i)) for i in pixel["_source"]]
    same = wrong_camera_batch(pixel, 0.0, axis)
    from pipelines.training.engine import camera_inputs

    assert "cameras" not in same and "cameras" not in pixel   # made by to_model_space from _R, _t
    assert torch.allclose(camera_inputs(same), camera_inputs(pixel), atol=1e-5)
    assert torch.allclose(same["plucker"].float(), pixel["plucker"].float(), atol=2e-2)   # stored as float16
    assert (same["anchor"] - pixel["anchor"]).abs().mean() < 0.02
    turned = wrong_camera_batch(pixel, 90.0, axis)
    assert torch.equal(turned["views"], pixel["views"])
    turned, pixel = {**turned, "cameras": camera_inputs(turned)}, {**pixel, "cameras": camera_inputs(pixel)}
    for name in ("cameras", "plucker", "anchor"):
        diff = (turned[name].float() - pixel[name].float()).flatten(2).abs().amax(-1)
        assert bool((diff > 0.1).all()), name
    head = pixel["_head"][:, None, :, 3].numpy()
    c0 = -np.einsum("bvji,bvj->bvi", pixel["_R"].numpy(), pixel["_t"].numpy()) - head
    from pipelines.evaluation import turn_camera

    for b in range(c0.shape[0]):
        for v in range(c0.shape[1]):
            R2, t2 = turn_camera(pixel["_R"][b, v].numpy(), pixel["_t"][b, v].numpy(), head[b, 0], 90.0)
            c1 = -R2.T @ t2 - head[b, 0]
            assert np.isclose(c1[2], c0[b, v, 2]) and np.isclose(np.linalg.norm(c1), np.linalg.norm(c0[b, v]))
            assert np.isclose(np.dot(c1[:2], c0[b, v, :2]), 0.0, atol=1e-9)      # a quarter turn


def test_heldout_cameras_eval_reports_seen_frames_and_the_wrong_camera_control(dataset, tmp_path, mlflow_uri):
    """A mid stage trained with held-out cameras: the eval scores novel cameras of held-out and of
    seen frames and the wrong-camera control; another holdout_cameras than the stage's is refused;
    ground-truth RE is measured on the same pairs (a perfect model = its floor)."""
    import pipelines.evaluation as ev

    ref, holdout = dataset
    overrides = [f"dataset={ref}", f"checkpoint.root={tmp_path}", "steps=1", "tracking.sample_every=0",
                 "tracking.system_metrics=false", "tracking.register_model=null", "tracking.experiment=train-cams",
                 f"model_overrides={json.dumps(MODEL)}", "data.resolution=64", "data.num_workers=0",
                 f"data.holdout_fraction={holdout}", "data.holdout_cameras=0.25", "resources.ray=false",
                 "data.views=2", "data.batch_size=2"]
    ckpt = run_stage(load_stage_config("configs/stages/mid.yaml", overrides))["checkpoint"]
    with pytest.raises(ValueError, match="holdout_cameras"):
        run_eval(eval_cfg(ckpt, dataset, samples=1, views=2, holdout_cameras=0.0))
    out = run_eval(eval_cfg(ckpt, dataset, samples=2, views=4))        # the stage's 0.25
    for key in ("eval/psnr", "eval/psnr_seen", "eval/ssim_seen", "eval/psnr_wrong_camera"):
        assert math.isfinite(out[key]), (key, out)
    assert out["eval/re_pairs_gt"] >= 1, out              # neighbouring held-out cameras: measurable
    truth = {}
    original = ev.generate
    try:
        ev.generate = lambda model, model_cfg, pixel, cfg, device: truth.setdefault(id(pixel), pixel["views"].clone())
        perfect = run_eval(eval_cfg(ckpt, dataset, samples=2, views=4, holdout_cameras=0.25))
    finally:
        ev.generate = original
    assert perfect["eval/re_pct_same_pairs"] == perfect["eval/re_pct_gt_same_pairs"]
    assert perfect["eval/psnr"] > 100 and perfect["eval/psnr_seen"] > 100


def test_turnaround_strip_generated_row_over_ground_truth_at_every_camera(checkpoints, dataset, tmp_path,
                                                                           monkeypatch):
    """The demo's strip: a held-out frame at all 16 cameras in azimuth order, generated over ground
    truth at the same cameras (a 'model' returning the ground truth makes both rows equal), the
    4 held-out cameras marked red; a pretrain checkpoint (no cameras) is refused."""
    import numpy as np
    from PIL import Image

    import pipelines.evaluation as ev

    ref, holdout = dataset
    cfg = EvalConfig(checkpoint=checkpoints["mid"], dataset=ref, holdout_fraction=holdout, views=16,
                     resolution=64, steps=2, experiment="test-eval")
    out = ev.turnaround_strip(cfg, str(tmp_path / "strip.png"))
    assert out["views"] == 16 and math.isfinite(out["psnr"]) and math.isfinite(out["psnr_heldout_cameras"])
    strip = np.asarray(Image.open(tmp_path / "strip.png"))
    bar = strip.shape[0] - 2 * 64
    assert strip.shape == (bar + 128, 16 * 64, 3) and bar >= 2
    red = [bool((strip[0, v * 64 + 32] == [255, 0, 0]).all()) for v in range(16)]
    assert sum(red) == 4                                   # 25 % of 16 cameras held out
    monkeypatch.setattr(ev, "generate", lambda model, model_cfg, pixel, cfg, device: pixel["views"].clone())
    perfect = ev.turnaround_strip(cfg, str(tmp_path / "strip2.png"))
    assert perfect["psnr"] > 100
    strip = np.asarray(Image.open(tmp_path / "strip2.png")).astype(int)
    assert np.abs(strip[bar:bar + 64] - strip[bar + 64:]).max() <= 1
    with pytest.raises(ValueError, match="pretrain"):
        ev.turnaround_strip(EvalConfig(checkpoint=checkpoints["pretrain"], dataset=ref, holdout_fraction=holdout,
                                       views=16, resolution=64), str(tmp_path / "strip3.png"))
