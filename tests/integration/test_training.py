"""Training stages end to end: loader -> DeepSpeed ZeRO under Ray Train -> checkpoints (local and
s3://) -> consolidated safetensors -> MLflow; resume after a killed worker, after a re-run and on
another number of workers; stage handoff; learning through the whole stack."""
import json
import os
import subprocess
import sys
import threading
import time

import mlflow
import pytest
import torch

from dataprep.build.job import run_build
from dataprep.build_config import BuildConfig, ShardLimits, Source
from dataprep.studio.synth import synth_capture, synth_images
from pipelines.training.checkpoint import CheckpointStore, resolve_weights
from pipelines.training.launcher import pin_datasets, run_stage
from support import SMALL_MODEL, stage_cfg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local):
    """A small version mixing studio captures (face crops on) and photos, uneven shards."""
    root = tmp_path_factory.mktemp("train_data")
    for k in range(2):
        synth_capture(root / "captures" / f"cap{k}", cameras=6, frames=8, height=96, width=64, seed=10 + k)
    synth_images(root / "photos", count=12, seed=3, person_fraction=1.0)
    uri = str(root / "store" / "ds")
    cfg = BuildConfig(dataset=uri, sources=[Source("captures", str(root / "captures")),
                                            Source("images", str(root / "photos"))],
                      resolution=64, plucker_stride=8, face_crop=True, face_resolution=32,
                      shard=ShardLimits(max_samples=5), partitions=2)
    vid = run_build(cfg, {})
    return f"{uri}@{vid}", vid


def metric_steps(run_id, key="train/loss"):
    return [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key)]


@pytest.mark.parametrize("zero", [(1, 2, 3), (3, 1, 2)], ids=["z1-z2-z3", "z3-z1-z2"])
def test_three_stages_on_two_ray_workers(dataset, tmp_path, fresh_mlflow, s3_server, zero):
    """pretrain -> mid -> post, 2 Ray Train workers each, every stage under another ZeRO stage;
    mid's checkpoints on s3://, the others on a local path; each stage starts from the previous
    stage's consolidated weights."""
    import fsspec

    fsspec.filesystem("s3").mkdirs(f"ckpt-{zero[0]}", exist_ok=True)
    ref, vid = dataset
    roots = {"pretrain": str(tmp_path / "ckpt"), "mid": f"s3://ckpt-{zero[0]}/runs", "post": str(tmp_path / "ckpt")}
    previous, summaries = None, {}
    for stage, z in zip(("pretrain", "mid", "post"), zero):
        cfg = stage_cfg(stage, ref, roots[stage], workers=2, init_from=previous,
                        deepspeed=f"configs/deepspeed/zero{z}.json")
        summaries[stage] = s = run_stage(cfg)
        assert s["step"] == 4 and s["samples"] == 4 * 2 * cfg.data.batch_size
        assert s["checkpoint"].startswith("s3://" if stage == "mid" else "file://")
        store = CheckpointStore(s["run_uri"])
        assert store.final_at(4) and store.latest()["step"] == 4
        assert store.latest()["zero_stage"] == z and store.latest()["world_size"] == 2
        previous = s["run_uri"]
    # a fresh process finds the runs by the SPEC §7 names and tags
    code = ("import json, mlflow; rs = mlflow.search_runs(search_all_experiments=True, "
            "filter_string=\"tags.`pippo.step` != ''\", output_format='list'); "
            "print(json.dumps([{'step': r.data.tags['pippo.step'], 'ckpt': r.data.tags.get('pippo.checkpoint'), "
            "'metrics': sorted(r.data.metrics), 'params': r.data.params.get('stage'), "
            "'digest': [d.dataset.digest for d in r.inputs.dataset_inputs]} for r in rs]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MLFLOW_TRACKING_URI": fresh_mlflow})
    runs = {r["step"]: r for r in json.loads(out.stdout.strip().splitlines()[-1])}
    assert set(runs) == {"pretrain", "mid", "post"}
    for stage, r in runs.items():
        assert r["params"] == stage and r["digest"] == [vid]
        assert r["ckpt"] == summaries[stage]["checkpoint"]
        assert {"train/loss", "train/lr", "train/samples_per_s", "train/grad_norm"} <= set(r["metrics"])
    client = mlflow.MlflowClient()
    for stage in runs:
        versions = client.search_model_versions(f"name='pippo-{stage}'")
        assert versions and versions[0].source == summaries[stage]["checkpoint"]
    # the grid of held-out samples was logged
    arts = [a.path for a in client.list_artifacts(summaries["post"]["mlflow_run_id"], "samples")]
    assert "samples/step_00000002.png" in arts


def test_handoff_output_equals_previous_stage_at_step_0(dataset, tmp_path, fresh_mlflow):
    """mid from pretrain's consolidated weights, post from mid's: new modules at zero init, so the
    handed-off model's prediction equals the previous stage's on the same input."""
    from pipelines.training.launcher import resolve_job
    from pipelines.training.worker import initial_model
    from pipelines.weights import load_final_model
    from pippo_model.config import ModelConfig

    ref, _ = dataset
    prev_uri = None
    for stage in ("pretrain", "mid", "post"):
        cfg = stage_cfg(stage, ref, tmp_path / "ck", steps=2, init_from=prev_uri,
                        **{"resources.ray": False, "tracking.sample_every": 0})
        summary = run_stage(cfg)
        if prev_uri is not None:
            prev, _ = load_final_model(prev_uri)
            job = resolve_job(cfg)
            new = initial_model(ModelConfig(**job["model"]), seed=123, init_from=prev_uri).eval()
            g = torch.Generator().manual_seed(0)
            b, v, s = 2, 2, 32
            x = torch.randn(b, v, 3, s, s, generator=g)
            t = torch.tensor([10, 900])
            cond = {"reference": torch.randn(b, 3, s, s, generator=g), "cameras": torch.randn(b, v, 16, generator=g),
                    "plucker": torch.randn(b, v, 6, 4, 4, generator=g), "anchor": torch.randn(b, v, 3, s, s, generator=g)}
            with torch.no_grad():
                assert torch.equal(prev(x, t, cond), new(x, t, cond))
                assert prev(x, t, cond).abs().max() > 0       # a trained model: not the trivial zero output
        prev_uri = summary["run_uri"]
    weights, config = resolve_weights(prev_uri)
    assert weights.endswith("final-step_00000002/model.safetensors") and config.endswith("final-step_00000002/model.json")


def _kill_a_worker_when(store: CheckpointStore, step: int, done: threading.Event, killed: list):
    import psutil

    while not done.is_set():
        if step in store.complete_steps():
            for p in psutil.process_iter(["cmdline"]):
                if any("RayTrainWorker" in part for part in (p.info["cmdline"] or [])):
                    p.kill()
                    killed.append(p.pid)
                    return
        time.sleep(0.2)


def test_killed_worker_resumes_with_one_continuous_curve(dataset, tmp_path, fresh_mlflow):
    ref, _ = dataset
    cfg = stage_cfg("pretrain", ref, tmp_path / "ck", workers=2, steps=10, **{
        "checkpoint.every_steps": 3, "tracking.sample_every": 0, "resources.max_failures": 2})
    store = CheckpointStore(pin_datasets(cfg).run_uri())
    done, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_a_worker_when, args=(store, 3, done, killed), daemon=True)
    watcher.start()
    try:
        summary = run_stage(cfg)
    finally:
        done.set()
    assert killed, "no Ray Train worker was killed"
    assert summary["step"] == 10
    steps = metric_steps(summary["mlflow_run_id"])
    assert steps == list(range(1, 11)), steps               # every step once, none twice
    assert len(mlflow.search_runs(experiment_names=["test-pretrain"], output_format="list")) == 1


def test_rerun_continues_on_another_world_size(dataset, tmp_path, fresh_mlflow):
    """2 workers to step 4; the same command with steps=8 on 1 worker resumes at step 4 (universal
    checkpoint): same run, same MLflow run, the curve continues."""
    ref, _ = dataset
    first = run_stage(stage_cfg("mid", ref, tmp_path / "ck", workers=2, steps=4, **{"tracking.sample_every": 0}))
    second = run_stage(stage_cfg("mid", ref, tmp_path / "ck", workers=1, steps=8, **{"tracking.sample_every": 0}))
    assert second["run_uri"] == first["run_uri"] and second["mlflow_run_id"] == first["mlflow_run_id"]
    assert second["step"] == 8 and second["samples"] == 4 * 2 * 2 + 4 * 1 * 2
    assert metric_steps(second["mlflow_run_id"]) == list(range(1, 9))
    store = CheckpointStore(second["run_uri"])
    assert store.latest()["world_size"] == 1
    # re-running a finished stage is a no-op with the same answer
    again = run_stage(stage_cfg("mid", ref, tmp_path / "ck", workers=1, steps=8, **{"tracking.sample_every": 0}))
    assert again["checkpoint"] == second["checkpoint"] and again["step"] == 8
    assert metric_steps(second["mlflow_run_id"]) == list(range(1, 9))


def test_latent_config_without_vae_path_is_one_line(dataset, tmp_path, fresh_mlflow):
    ref, _ = dataset
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "configs/stages/pretrain.yaml",
                           f"dataset={ref}", "model_overrides.space=latent", "model_overrides.latent_channels=4",
                           "model_overrides.vae_downsample=8", "model_overrides.patch_size=2", "--local"],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "vae_path" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "configs/stages/pretrain.yaml",
                           f"dataset={tmp_path}/nothing@latest", "--local"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no versions" in proc.stderr


def test_latent_space_with_seeded_standin_vae(dataset, tmp_path, fresh_mlflow, caplog):
    """A latent config trains with the random stand-in VAE only when asked, and says so."""
    ref, _ = dataset
    latent = {**SMALL_MODEL, "space": "latent", "latent_channels": 4, "vae_downsample": 8, "patch_size": 2}
    cfg = stage_cfg("pretrain", ref, tmp_path / "ck", steps=2, vae_standin_seed=7,
                    **{"resources.ray": False, "model_overrides": latent, "tracking.sample_every": 1})
    with caplog.at_level("WARNING", logger="pippo.train"):
        summary = run_stage(cfg)
    assert summary["step"] == 2
    assert any("STAND-IN VAE" in r.message for r in caplog.records)


def test_learns_through_the_whole_stack(dataset, tmp_path, fresh_mlflow):
    """loader -> DeepSpeed -> checkpoint -> consolidated safetensors: the training loss falls >= 5x
    and DDIM samples of the consolidated weights match held-out views better than at init."""
    from dataprep.loader import TrainingLoader
    from pipelines.training.engine import to_model_space
    from pipelines.training.worker import initial_model
    from pipelines.weights import load_final_model
    from pippo_model.autoencoder import PixelSpace
    from pippo_model.diffusion import CosineSchedule, conditions
    from pippo_model.metrics.image import psnr
    from pippo_model.sampler import ddim_sample

    ref, _ = dataset
    cfg = stage_cfg("mid", ref, tmp_path / "ck", steps=LEARN_STEPS, **{
        "resources.ray": False, "tracking.sample_every": 0, "tracking.log_every": 20,
        "checkpoint.every_steps": LEARN_STEPS, "optim.lr": 1e-3, "optim.warmup_steps": 10, "ema.decay": 0.99,
        "data.batch_size": 4, "data.holdout_fraction": 0.3,
        # the trainer learning its training cameras; novel cameras are benches/learning.py's question
        "data.holdout_cameras": 0.0, "model_overrides": {**SMALL_MODEL, "dim": 128, "depth": 4}})
    summary = run_stage(cfg)
    losses = [m.value for m in mlflow.MlflowClient().get_metric_history(summary["mlflow_run_id"], "train/loss")]
    assert losses[-1] < losses[0] / 5, losses

    loader = TrainingLoader(cfg.sources, "mid", cfg.data)
    pixel = loader.heldout_batch(2)
    batch = to_model_space(pixel, PixelSpace(), torch.device("cpu"), torch.float32)

    def sample_psnr(model):
        out = ddim_sample(model, CosineSchedule(), conditions(batch), tuple(batch["views"].shape), steps=20,
                          eta=0.0, clip=1.0, generator=torch.Generator().manual_seed(0))
        return psnr(out, batch["views"]).mean().item()

    trained, model_cfg = load_final_model(summary["run_uri"])
    # attention biasing's N_train is the trained sequence (data.views + reference at data.resolution),
    # not the size preset's `views`
    assert model_cfg.attn_n_train == (cfg.data.views + 1) * (cfg.data.resolution // model_cfg.patch_size) ** 2
    assert trained.generator.cfg.n_train_tokens == model_cfg.attn_n_train
    untrained = initial_model(model_cfg, seed=0, init_from=None).eval()
    with torch.no_grad():
        before, after = sample_psnr(untrained), sample_psnr(trained)
    assert after > before + 3.0, (before, after)


LEARN_STEPS = 240
