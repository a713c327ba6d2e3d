"""Session fixtures shared by every test group (tests/unit, tests/integration, tests/e2e): one
synthetic capture, one tiny model config, one MLflow sqlite URI, the moto S3 server, one local Ray
and one small dataset version built through the real build. Read-only: a test that changes a
store or a tracking database makes its own (tmp_path) instead."""
import os

import pytest

from support import TINY_MODEL, Version, free_port, wait_http

os.environ.setdefault("RAY_ADDRESS", "")  # never attach tests to a stray cluster
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def synth_capture_dir(tmp_path_factory):
    """One small synthetic capture (6 cameras, 2 frames, masks, PNG) shared by read-only tests."""
    from dataprep.studio.synth import synth_capture

    return synth_capture(tmp_path_factory.mktemp("captures") / "cap0", cameras=6, frames=2,
                         height=96, width=64, seed=5)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, its endpoint exported for s3fs/boto (and so for Ray
    workers, which inherit the environment when the session's local Ray starts)."""
    import subprocess
    import sys
    from pathlib import Path
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint)
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update(env)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One in-process local Ray for the session, started after the S3 endpoint is exported."""
    from pippo_common.ray_start import ensure_ray
    ray = ensure_ray(dashboard=True)   # Ray Train's controller polls the state API
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model() -> dict:
    """support.TINY_MODEL as `model_overrides` take it (a copy: a test may extend it)."""
    return dict(TINY_MODEL)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One sqlite MLflow store for the session; tests keep their runs apart by experiment name.
    Tests that count runs across experiments, or run the same experiment twice, use their own."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture
def fresh_mlflow(tmp_path, monkeypatch) -> str:
    """A sqlite MLflow store of this test's own, exported (env and mlflow's default): for tests that
    search an experiment's runs and must not see another test's."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture(scope="session")
def small_version(tmp_path_factory, ray_local) -> Version:
    """One capture (6 cameras x 4 frames, 96x64) and 6 person photos, built once per session by
    run_build at 64 px with face crops, shards of <= 8: enough for every stage's loader (pretrain
    photos, mid/post studio views and face crops). Never written to: copy it to change it."""
    from dataprep.build.job import run_build
    from dataprep.build_config import BuildConfig, ShardLimits, Source
    from dataprep.studio.synth import synth_capture, synth_images

    root = tmp_path_factory.mktemp("small_version")
    synth_capture(root / "captures" / "cap0", cameras=6, frames=4, height=96, width=64, seed=3)
    synth_images(root / "photos", count=6, seed=3, person_fraction=1.0)
    uri = str(root / "store" / "ds")
    cfg = BuildConfig(dataset=uri, sources=[Source("captures", str(root / "captures")),
                                            Source("images", str(root / "photos"))],
                      resolution=64, plucker_stride=8, face_crop=True, face_resolution=32,
                      shard=ShardLimits(max_samples=8), partitions=1)
    return Version(uri, run_build(cfg, {}))
