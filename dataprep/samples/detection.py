"""Person and face detection: two backends behind one interface, and the rules that use them.

    OpenCvDetector  OpenCV's bundled HOG + linear-SVM people detector (Dalal & Triggs 2005) and its
                    Haar frontal-face cascade (Viola & Jones 2001): nothing to download, CPU only
    TorchDetector   any `module:callable` returning a torchvision-style detection model (Faster /
                    Keypoint R-CNN, or the project's dataprep.samples.tiny_detector), weights read from a
                    local path or an object-store URI as safetensors (never a hub, never a pickle)

`Detector.detect(images)` takes a batch of upright RGB uint8 photos and returns one `Detections`
per photo, boxes in that photo's pixels. The build runs detectors in Ray actors
(dataprep.samples.detect_stage); `pippo sample` runs the same one in-process. `judge` turns detections
into a decision: a `Rejected("detect", ...)` naming the best score, or the person to crop around.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field

import cv2
import numpy as np

from dataprep.build_config import DetectorConfig
from pippo_common.errors import DataError
from dataprep.inputs.photos import Rejected

log = logging.getLogger("pippo.data.detect")

HOG_SIDE = 400              # HOG's cost grows with the pixels; its 64x128 window fits people here
HOG_CANDIDATE_MARGIN = 2.0  # windows this far below the threshold are still scored (for reasons)
MAX_WEIGHTS_BYTES = 4 * 2**30
DEFAULT_SCORES = {"hog": 0.0, "haar": 0.0, "torch": 0.5}


@dataclass
class Found:
    box: list[float]                      # [x0, y0, x1, y1], pixels of the image given to detect
    score: float
    keypoints: list[list[float]] | None = None    # [[x, y, visibility], ...] when the model has them

    def scaled(self, sx: float, sy: float) -> "Found":
        kps = None if self.keypoints is None else [[x * sx, y * sy, v] for x, y, v in self.keypoints]
        x0, y0, x1, y1 = self.box
        return Found([x0 * sx, y0 * sy, x1 * sx, y1 * sy], self.score, kps)

    def to_json(self) -> dict:
        out = {"box": [round(v, 2) for v in self.box], "score": round(self.score, 4)}
        if self.keypoints is not None:
            out["keypoints"] = [[round(v, 2) for v in k] for k in self.keypoints]
        return out


@dataclass
class Detections:
    """People and faces at or above the backend's thresholds, plus the best score seen at all
    (None: no candidate) so that a rejection can say how close it came."""
    backend: str
    persons: list[Found] = field(default_factory=list)
    faces: list[Found] | None = None      # None: faces were not looked for
    best_person: float | None = None
    best_face: float | None = None
    min_person: float = 0.0               # the thresholds applied (for the reasons)
    min_face: float = 0.0

    def scaled(self, sx: float, sy: float) -> "Detections":
        return Detections(self.backend, [f.scaled(sx, sy) for f in self.persons],
                          None if self.faces is None else [f.scaled(sx, sy) for f in self.faces],
                          self.best_person, self.best_face, self.min_person, self.min_face)

    def to_json(self) -> dict:
        out = {"backend": self.backend, "persons": [f.to_json() for f in self.persons]}
        if self.faces is not None:
            out["faces"] = [f.to_json() for f in self.faces]
        return out


class Detector:
    """The interface: load once (the constructor), then detect batches."""
    name = "?"

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        raise NotImplementedError


def _best(scores) -> float | None:
    return float(np.max(scores)) if len(scores) else None


class OpenCvDetector(Detector):
    name = "opencv"

    def __init__(self, cfg: DetectorConfig, faces: bool):
        if not hasattr(cv2, "HOGDescriptor"):   # OpenCV 5 wheels moved HOG and cascades out
            raise DataError(f"OpenCV {cv2.__version__} has no HOG people detector: install the "
                            "opencv-python-headless pinned in requirements.lock")
        self.hog = cv2.HOGDescriptor()
        self.hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
        self.min_person = _threshold(cfg.min_person_score, "hog")
        self.min_face = _threshold(cfg.min_face_score, "haar")
        self.face = load_face_cascade() if faces else None

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        # HOG has no batched API: the batch saves the actor round trips, not the compute
        return [self._one(rgb) for rgb in images]

    def _one(self, rgb: np.ndarray) -> Detections:
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        h, w = grey.shape
        # never below the 64x128 window (+ a stride): OpenCV 4.14's HOG crashes (SIGSEGV) on
        # some images smaller than its window instead of returning nothing
        scale = max(min(1.0, HOG_SIDE / max(h, w)), 136 / h, 72 / w)
        small = grey if scale == 1.0 else cv2.resize(
            grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        # scored from below the threshold too: a rejection then says how close the photo came
        rects, weights = self.hog.detectMultiScale(small, hitThreshold=self.min_person - HOG_CANDIDATE_MARGIN,
                                                   winStride=(8, 8), padding=(8, 8), scale=1.05)
        weights = np.ravel(weights) if len(rects) else np.zeros(0)
        persons = [Found([x / scale, y / scale, (x + w) / scale, (y + h) / scale], float(s))
                   for (x, y, w, h), s in zip(np.asarray(rects).reshape(-1, 4).tolist(), weights)
                   if s >= self.min_person]
        out = Detections(self.name, persons, best_person=_best(weights), min_person=self.min_person,
                         min_face=self.min_face)
        if self.face is not None:
            out.faces, out.best_face = haar_faces(self.face, grey, self.min_face)
        return out


def load_face_cascade():
    face = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if face.empty():
        raise DataError("OpenCV's bundled Haar face cascade could not be loaded")
    return face


def haar_faces(cascade, grey: np.ndarray, min_score: float) -> tuple[list[Found], float | None]:
    rects, _, weights = cascade.detectMultiScale3(grey, scaleFactor=1.1, minNeighbors=4, outputRejectLevels=True)
    weights = np.ravel(weights) if len(rects) else np.zeros(0)
    faces = [Found([x, y, x + w, y + h], float(s))
             for (x, y, w, h), s in zip(np.asarray(rects).reshape(-1, 4).tolist(), weights) if s >= min_score]
    return faces, _best(weights)


def _threshold(value: float | None, kind: str) -> float:
    return DEFAULT_SCORES[kind] if value is None else float(value)


class TorchDetector(Detector):
    """A torchvision-style detection model. With keypoints (Keypoint R-CNN, COCO order: nose,
    eyes, ears first) a face is a person whose nose and both eyes are visible; without them faces
    come from the Haar cascade."""
    name = "torch"

    def __init__(self, cfg: DetectorConfig, faces: bool, device: str | None = None):
        import torch
        if cfg.weights is None:
            raise DataError("detector.weights is required for the torch backend (a local path or "
                            "object-store URI of a .safetensors file: weights are never downloaded)")
        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_torch_model(cfg).to(self.device).eval()
        self.person_label = cfg.person_label
        self.min_person = _threshold(cfg.min_person_score, "torch")
        self.min_face = _threshold(cfg.min_face_score, "haar")
        self.face = load_face_cascade() if faces else None

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        torch = self.torch
        # arrays from Ray's object store are read-only: torch wants its own (cheap at max_side)
        batch = [torch.from_numpy(rgb if rgb.flags.writeable and rgb.flags.c_contiguous else np.array(rgb))
                 .to(self.device).permute(2, 0, 1).float() / 255.0 for rgb in images]
        with torch.inference_mode():
            outputs = self.model(batch) if batch else []
        return [self._one(rgb, out) for rgb, out in zip(images, outputs)]

    def _one(self, rgb: np.ndarray, out: dict) -> Detections:
        labels = out["labels"].cpu().numpy()
        keep = labels == self.person_label
        scores = out["scores"].float().cpu().numpy()[keep]
        boxes = out["boxes"].float().cpu().numpy()[keep]
        kps = out["keypoints"].float().cpu().numpy()[keep] if "keypoints" in out else None
        persons = [Found(boxes[i].tolist(), float(scores[i]), None if kps is None else kps[i].tolist())
                   for i in range(len(scores)) if scores[i] >= self.min_person]
        result = Detections(self.name, persons, best_person=_best(scores), min_person=self.min_person,
                            min_face=self.min_person if kps is not None else self.min_face)
        if self.face is not None:
            if kps is not None:
                result.faces = [Found(p.box, p.score, p.keypoints) for p in persons
                                if all(k[2] > 0 for k in p.keypoints[:3])]
                result.best_face = max((f.score for f in result.faces), default=None)
            else:
                grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
                result.faces, result.best_face = haar_faces(self.face, grey, self.min_face)
        return result


def build_torch_model(cfg: DetectorConfig):
    """`module:callable(**model_kwargs)` with the safetensors state dict of `cfg.weights`.
    (torchvision's builders are given weights=None and weights_backbone=None: a builder must
    never fetch pretrained weights from a hub at run time.)"""
    import torch
    from safetensors.torch import load as load_safetensors

    module_name, _, attr = cfg.model.partition(":")
    try:
        factory = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as exc:
        raise DataError(f"detector.model {cfg.model!r} cannot be imported: {exc}") from None
    kwargs = dict(cfg.model_kwargs)
    if module_name.startswith("torchvision."):
        kwargs.update(weights=None, weights_backbone=None)
    model = factory(**kwargs)
    if not isinstance(model, torch.nn.Module):
        raise DataError(f"detector.model {cfg.model!r} returned a {type(model).__name__}, not a torch module")
    try:
        state = load_safetensors(read_capped(cfg.weights, MAX_WEIGHTS_BYTES))
        model.load_state_dict(state, strict=True)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"detector.weights {cfg.weights}: no such file") from None
    except Exception as exc:   # safetensors' header errors, shape / key mismatches
        raise DataError(f"detector.weights {cfg.weights} do not fit {cfg.model}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    return model


def read_capped(uri: str, limit: int) -> bytes:
    from pippo_common.storage import fs_and_path
    fs, path = fs_and_path(uri)
    if not fs.isfile(path):
        raise FileNotFoundError(uri)
    size = fs.size(path)
    if size is None or size > limit:
        raise DataError(f"{uri}: {size} bytes exceeds the limit of {limit}")
    with fs.open(path, "rb") as f:
        return f.read(limit + 1)[:limit]


def build_detector(cfg: DetectorConfig, faces: bool, device: str | None = None) -> Detector:
    return OpenCvDetector(cfg, faces) if cfg.backend == "opencv" else TorchDetector(cfg, faces, device)


def detection_input(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The photo as sent to a detector (at most max_side) and the factor back to its pixels."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return rgb, 1.0
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return small, w / small.shape[1]


# ---- decisions -----------------------------------------------------------------------------------

def miss_reason(what: str, backend: str, best: float | None, threshold: float) -> Rejected:
    seen = "no candidate scored at all" if best is None else f"best score {best:.3f}"
    return Rejected("detect", f"no {what} detected ({backend}): {seen} < min score {threshold:g}")


def judge(det: Detections, need_person: bool, need_face: bool) -> Found | None:
    """Rejected("detect", ...) with the best score when a required person / face is missing;
    else the person to crop around (the largest box; ties: the higher score), or None."""
    if need_person and not det.persons:
        raise miss_reason("person", det.backend, det.best_person, det.min_person)
    if need_face and not det.faces:
        raise miss_reason("face", det.backend, det.best_face, det.min_face)
    if not det.persons:
        return None
    return max(det.persons, key=lambda f: ((f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), f.score))


def square_around(height: int, width: int, box, margin: float) -> tuple[int, int, int]:
    """(x0, y0, side): the square around `box` [x0, y0, x1, y1] plus `margin` of its longer side
    on each side, centred on the box and shifted (then shrunk) to stay inside the image: no
    padding the model never saw."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    side = int(round(max(bw, bh) * (1 + 2 * margin)))
    side = max(1, min(side, height, width))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, side
