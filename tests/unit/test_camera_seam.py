"""The data/model seam (issue 18 step 3): the loader delivers the SPEC cameras (R, t) and the
camera MLP's vectors are made once, on the model side, by `to_model_space`; config types import
without the data stack."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from dataprep.studio.geometry import look_at
from dataprep.loader.training_loader import _as_tensors, collate
from pipelines.training.engine import camera_inputs, to_model_space
from pippo_model.autoencoder import PixelSpace
from pippo_model.conditioning import camera_vectors


def _cameras(rng, views: int) -> list[dict]:
    out = []
    for _ in range(views):
        eye = rng.normal(size=3) * rng.uniform(0.5, 3.0)
        R, t = look_at(eye, rng.normal(size=3) * 0.05)
        out.append({"R": R.tolist(), "t": t.tolist()})     # as a sample's json holds them
    return out


def _old_loader_cameras(views: list[dict]) -> np.ndarray:
    """What dataprep/stage_samples.py computed per sample before the seam moved (verbatim)."""
    Rs = torch.tensor(np.array([v["R"] for v in views]), dtype=torch.float64)
    ts = torch.tensor(np.array([v["t"] for v in views]), dtype=torch.float64)
    return camera_vectors(Rs, ts).numpy().astype(np.float32)


def _new_loader_sample(views: list[dict]) -> dict:
    """What dataprep/loader/decode.py delivers now: the cameras themselves."""
    return {"_R": np.array([v["R"] for v in views], dtype=np.float64),
            "_t": np.array([v["t"] for v in views], dtype=np.float64)}


def test_to_model_space_makes_the_same_camera_vectors_as_the_old_loader_bit_for_bit():
    rng = np.random.default_rng(7)
    samples = [_cameras(rng, 5) for _ in range(6)]
    old = _as_tensors(collate([{"key": str(k), "cameras": _old_loader_cameras(s)} for k, s in enumerate(samples)]))["cameras"]
    batch = _as_tensors(collate([{"key": str(k), **_new_loader_sample(s)} for k, s in enumerate(samples)]))
    assert "cameras" not in batch and batch["_R"].dtype == torch.float64
    new = to_model_space(batch, PixelSpace(), torch.device("cpu"), torch.float32)["cameras"]
    assert new.shape == (6, 5, 16) and new.dtype == torch.float32
    assert torch.equal(new, old)
    # a batch that already carries camera vectors (a test, a bench) keeps them
    given = {**batch, "cameras": torch.zeros(6, 5, 16)}
    assert camera_inputs(given) is None
    assert torch.equal(to_model_space(given, PixelSpace(), torch.device("cpu"), torch.float32)["cameras"],
                       torch.zeros(6, 5, 16))


def test_a_batch_without_cameras_gets_no_camera_vectors():
    batch = {"views": torch.zeros(2, 1, 3, 8, 8), "reference": torch.zeros(2, 3, 8, 8)}
    assert camera_inputs(batch) is None
    assert "cameras" not in to_model_space(batch, PixelSpace(), torch.device("cpu"), torch.float32)


def test_sampling_feeds_cameras_through_to_model_space():
    """pipelines.sample builds the loader contract (R, t), not camera vectors of its own."""
    from pipelines.sample import orbit_cameras, pixel_conditions
    from pippo_model.config import ModelConfig

    cfg = ModelConfig(camera_mlp=True, control_mlp=False)
    cams = orbit_cameras(4, 32, 10.0, 2.0)
    batch = pixel_conditions(cfg, np.zeros((32, 32, 3), np.uint8), cams)
    assert "cameras" not in batch
    Rs = torch.tensor(np.array([c["R"] for c in cams]))
    ts = torch.tensor(np.array([c["t"] for c in cams]))
    expected = camera_vectors(Rs, ts).float()[None]          # the old pixel_conditions
    got = to_model_space(batch, PixelSpace(), torch.device("cpu"), torch.float32)["cameras"]
    assert torch.equal(got, expected)


CONFIG_MODULES = ("dataprep.loader", "dataprep.loader.config", "pipelines.training.config")


def test_config_types_import_without_the_data_stack():
    heavy = ("torch", "cv2", "webdataset")
    code = "; ".join([*(f"import {m}" for m in CONFIG_MODULES), "import sys",
                      f"bad = [m for m in {heavy!r} if m in sys.modules]",
                      "assert not bad, bad",
                      "from dataprep.loader import LoaderConfig, DataSource; LoaderConfig(); DataSource('x@latest')"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_loader_package_keeps_its_public_names():
    from dataprep.loader import STAGE_KIND, DataSource, LoaderConfig, TrainingLoader
    from dataprep.loader.training_loader import TrainingLoader as direct

    assert TrainingLoader is direct and STAGE_KIND["mid"] == "studio"
    assert LoaderConfig().batch_size >= 1 and DataSource("a@b").weight == 1.0
