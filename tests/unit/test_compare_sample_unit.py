"""`pippo sample`'s pieces without a trained run: the square around a person, the reference crop
(synthetic boxes and the build's detector on a rendered photo), and sampling views in chunks when a
joint pass runs out of memory. The runs themselves: tests/integration/test_compare_sample.py."""
import numpy as np

from support import SMALL_MODEL


def test_person_square():
    from dataprep.samples.detection import square_around

    # a standing person in a landscape photo: a square around the box, margin included, inside
    assert square_around(480, 640, (300, 100, 360, 220), margin=0.25) == (240, 70, 180)
    # near the border: shifted in, never padded; too large: shrunk to the short side
    assert square_around(480, 640, (600, 10, 630, 70), margin=0.25) == (550, 0, 90)
    assert square_around(480, 640, (100, 0, 400, 470), margin=0.25) == (10, 0, 480)


def test_reference_crop_around_the_largest_person():
    """The detector's boxes are what matters here: a stub backend behind the same interface."""
    from dataprep.samples.detection import Detections, Found
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
    from dataprep.inputs.photos import decode_photo
    from dataprep.studio.synth import synth_images
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
    model = types.SimpleNamespace(cfg=ModelConfig(**SMALL_MODEL, max_views=8).for_stage("mid"))
    cond = {"reference": torch.zeros(1, 3, 32, 32), "cameras": torch.zeros(1, 10, 16)}
    kw = dict(steps=1, guidance=1.0, seed=0, gamma=1.0, n_train=3 * 64, device=torch.device("cpu"))
    x, info = sample.sample_views(model, cond, 10, 32, **kw)
    assert x.shape == (10, 3, 32, 32) and info == {"chunk": 3, "gamma": 1.0}
    assert [p[0] for p in passes] == [5, 3, 3, 3, 1]          # 10 > max_views: 5 + 5 first, then halved
    assert passes[-1] == (1, None, 1) and passes[1] == (3, 1.0, 3)
