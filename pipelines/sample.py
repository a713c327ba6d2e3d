"""`pippo sample --checkpoint URI --image PATH [--views N] --out PATH`: one photo -> a turnaround.

The photo (any size, any format PIL decodes) is decoded the way the build decodes photos, the
person is found and cropped to a square, and that crop becomes the reference at the model's
training resolution. N target cameras sit on an orbit (Hi3D-style: fixed elevation and radius,
evenly spaced azimuths, all looking at the origin, where the head is). The stage's conditioning is
built exactly like the loader builds it for training: camera vectors (mid, post), Plücker maps on
the model's token grid and spatial anchors of an identity head pose at the origin (post). All N
views are sampled jointly with DDIM + classifier-free guidance (attention biasing when the
sequence is longer than in training), in chunks only when they do not fit; then decoded by the
model's autoencoder and written as a GIF, an MP4, PNG views and a cameras.json that
`pippo eval reprojection` reads (SPEC §2).

World frame: metres, z up, the subject faces +y (the convention of dataprep.studio.synth and of the
loader's frontal view), so azimuth 0 looks at the face — the view the reference photo shows.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pippo_common.checks import check_resolution
from pippo_common.errors import UserError
from pipelines.weights import stage_of, train_tokens, trained_shape

log = logging.getLogger("pippo.sample")

# The dome's cameras see 30-40 deg vertically on portrait frames that the build square-crops to
# their width (~0.65 of the height): ~20-27 deg across the square views the model was trained on.
FOV_DEG = 24.0
AXIS_M = 0.2               # spatial-anchor axis length, as dataprep draws it (anchor_axis_m)
MARGIN = 0.2               # around a detected person, each side, as a fraction of the box
MAX_PIXELS = 64_000_000    # the build's decompression-bomb limit (filters.max_pixels)
FRAME_MS = 100             # GIF frame time; the MP4 runs at the same rate


# -- the photo ------------------------------------------------------------------------------------

def read_photo(uri: str) -> np.ndarray:
    """Upright 8-bit RGB of a local path or fsspec URL, decoded like the build decodes photos."""
    from dataprep.inputs.photos import Rejected, decode_photo
    from pippo_common.storage import read_bytes

    try:
        return decode_photo(read_bytes(uri), MAX_PIXELS).rgb
    except Rejected as exc:
        raise UserError(f"{uri}: {exc.reason}") from None


def reference_crop(rgb: np.ndarray, side_out: int, detector=None) -> tuple[np.ndarray, dict]:
    """The reference (side_out², uint8) and how it was cut: a square around the largest person
    found by the build's detector (dataprep.samples.detection, default backend unless `detector` is
    given) plus MARGIN, else the centre square (logged: the subject may be cut)."""
    from dataprep.build_config import DetectorConfig
    from dataprep.samples.detection import build_detector, detection_input, judge, miss_reason, square_around
    from dataprep.inputs.photos import center_square, resize

    h, w = rgb.shape[:2]
    cfg = DetectorConfig(margin=MARGIN)
    detector = detector or build_detector(cfg, faces=False)
    small, back = detection_input(rgb, cfg.max_side)
    found = detector.detect([small])[0].scaled(back, back)
    person = judge(found, need_person=False, need_face=False)
    if person is not None:
        x0, y0, side = square_around(h, w, person.box, cfg.margin)
        crop = resize(rgb[y0:y0 + side, x0:x0 + side], side_out, side_out)
        return crop, {"how": "person", "box": [x0, y0, side], "person": [round(v, 1) for v in person.box],
                      "score": round(person.score, 4), "detector": found.backend}
    why = miss_reason("person", found.backend, found.best_person, found.min_person).reason
    log.info("%s: using the centre square of the %dx%d photo", why, w, h)
    crop, box = center_square(rgb, side_out)
    return crop, {"how": "centre", "box": box, "reason": why}


# -- cameras and conditioning ------------------------------------------------------------------------

def orbit_cameras(n: int, side: int, elevation_deg: float, radius: float,
                  fov_deg: float = FOV_DEG) -> list[dict]:
    """`n` square cameras on a horizontal orbit (fixed elevation and radius, azimuth 2πk/n from
    the front), looking at the origin; SPEC §4 (world-to-camera OpenCV, metres)."""
    from dataprep.studio.geometry import look_at

    f = (side / 2) / math.tan(math.radians(fov_deg) / 2)
    c = (side - 1) / 2                                 # pixel centres: the image centre
    K = np.array([[f, 0.0, c], [0.0, f, c], [0.0, 0.0, 1.0]])
    el = math.radians(elevation_deg)
    cams = []
    for k in range(n):
        az = 2 * math.pi * k / n
        eye = radius * np.array([math.cos(el) * math.sin(az), math.cos(el) * math.cos(az), math.sin(el)])
        R, t = look_at(eye, np.zeros(3))
        cams.append({"K": K.copy(), "R": R, "t": t, "height": side, "width": side,
                     "camera_id": f"orbit{k:03d}", "azimuth_deg": math.degrees(az)})
    return cams


def pixel_conditions(model_cfg, reference: np.ndarray, cams: list[dict]) -> dict:
    """The loader's batch contract (dataprep.loader, pixels in [-1, 1]) for one sample: what
    `to_model_space` turns into the model's `cond`. Only the inputs the stage has."""
    import torch

    from dataprep.studio.anchors import draw_anchor
    from dataprep.studio.geometry import plucker, resize_intrinsics

    def images(hwc: np.ndarray) -> torch.Tensor:           # uint8 (..., H, W, 3) -> [-1, 1] CHW
        return torch.from_numpy(hwc).movedim(-1, -3).float().div(127.5).sub(1.0)

    side = reference.shape[0]
    batch = {"reference": images(reference)[None]}
    if model_cfg.camera_mlp:     # the targets' cameras; to_model_space makes the camera vectors
        batch["_R"] = torch.tensor(np.array([c["R"] for c in cams]))[None]
        batch["_t"] = torch.tensor(np.array([c["t"] for c in cams]))[None]
    if model_cfg.control_mlp:
        # Plücker on the token grid (training: the version's stored grid, resolution/stride),
        # with K resized to that grid (SPEC §4); anchors of the head pose at the origin.
        grid = side // (model_cfg.vae_downsample * model_cfg.patch_size)
        pose = np.concatenate([np.eye(3), np.zeros((3, 1))], axis=1)
        rays = [plucker(resize_intrinsics(c["K"], grid / side), c["R"], c["t"], grid, grid) for c in cams]
        anchors = [draw_anchor(c["K"], c["R"], c["t"], side, side, pose, AXIS_M).image.transpose(1, 2, 0)
                   for c in cams]
        batch["plucker"] = torch.from_numpy(np.stack(rays)).float()[None]
        batch["anchor"] = images(np.stack(anchors))[None]
    return batch


# -- the model ------------------------------------------------------------------------------------

def _out_of_memory(exc: BaseException) -> bool:
    """CUDA's OOM, or the CPU allocator's refusal (Linux may kill the process instead: the CPU's
    SDPA kernels never hold the N x N logits, so activations would have to reach the RAM first)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def _sample_chunks(model, schedule, cond: dict, n: int, chunk: int, side: int, *, steps: int,
                   guidance: float, seed: int, gamma: float, n_train: int, device) -> tuple:
    """DDIM + CFG over views [0, n) in passes of `chunk` views, each pass with the reference.
    Returns ((n, C, h, w), the gamma used or None)."""
    import torch

    from pippo_model.sampler import ddim_sample

    cfg = model.cfg
    h = side // cfg.vae_downsample
    per_view = (h // cfg.patch_size) ** 2
    outs, used = [], None
    for k, lo in enumerate(range(0, n, chunk)):
        v = min(chunk, n - lo)
        part = {key: (val[:, lo:lo + v] if key in ("cameras", "plucker", "anchor") else val)
                for key, val in cond.items()}
        # attention biasing only for sequences longer than a training sample (Pippo eq. 4)
        g = gamma if (v + 1) * per_view > n_train else None
        used = used if g is None else g
        gen = torch.Generator(device=device).manual_seed(seed + 7919 * k)
        outs.append(ddim_sample(model, schedule, part, (1, v, cfg.latent_channels, h, h), steps=steps, eta=0.0,
                                guidance=guidance, gamma=g, generator=gen,
                                clip=1.0 if cfg.space == "pixel" else None)[0])
    return torch.cat(outs), used


def sample_views(model, cond: dict, n: int, side: int, **kw) -> tuple:
    """(N, C, h, w) model-space views: all jointly when they fit, else in chunks halved until they
    do (fewer views see each other, so consistency drops: logged). Returns (x, info)."""
    import torch

    from pippo_model.diffusion import CosineSchedule

    passes = math.ceil(n / model.cfg.max_views)        # rows of the per-view embedding table
    chunk = math.ceil(n / passes)                      # balanced passes: 33 -> 17 + 16, not 32 + 1
    schedule = CosineSchedule(model.cfg.timesteps).to(kw["device"])
    while True:
        try:
            x, gamma = _sample_chunks(model, schedule, cond, n, chunk, side, **kw)
            break
        except RuntimeError as exc:                    # torch.OutOfMemoryError is one
            if chunk == 1 or not _out_of_memory(exc):
                raise
            chunk = (chunk + 1) // 2
            if kw["device"].type == "cuda":
                torch.cuda.empty_cache()
            log.warning("out of memory: sampling %d views per pass instead", chunk)
    if chunk < n:
        log.warning("%d views sampled in chunks of %d (jointly only within a chunk)", n, chunk)
    return x, {"chunk": chunk, "gamma": gamma}


# -- outputs --------------------------------------------------------------------------------------

def output_paths(out: str) -> dict[str, Path]:
    path = Path(out)
    if path.suffix.lower() not in (".gif", ".mp4"):
        raise UserError(f"--out {out}: name a .gif (or .mp4) file")
    return {"gif": path.with_suffix(".gif"), "mp4": path.with_suffix(".mp4"),
            "views": path.with_name(f"{path.stem}_views")}


def write_gif(frames: np.ndarray, path: Path) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    # disposal 2 and no optimize: every frame is stored whole, so N views are N frames
    images[0].save(path, save_all=True, append_images=images[1:], duration=FRAME_MS, loop=0,
                   disposal=2, optimize=False)


def write_mp4(frames: np.ndarray, path: Path) -> bool:
    import cv2

    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 1000 / FRAME_MS, (w, h))
    if not writer.isOpened():
        log.warning("no MP4 written: this OpenCV cannot encode mp4v")
        return False
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return True


def write_views(frames: np.ndarray, reference: np.ndarray, cams: list[dict], directory: Path,
                meta: dict) -> None:
    """view00.png, ... + cameras.json in the `pippo eval reprojection` layout (SPEC §2); stale
    views of an earlier, longer run are removed so the folder stays one consistent set."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("view[0-9][0-9]*.png"):
        old.unlink()
    for k, f in enumerate(frames):
        Image.fromarray(f).save(directory / f"view{k:02d}.png")
    Image.fromarray(reference).save(directory / "reference.png")
    records = [{"K": c["K"].tolist(), "R": c["R"].tolist(), "t": c["t"].tolist(), "height": c["height"],
                "width": c["width"], "camera_id": c["camera_id"], "azimuth_deg": round(c["azimuth_deg"], 6)}
               for c in cams]
    (directory / "cameras.json").write_text(json.dumps({"views": records, "sample": meta}, indent=1))


# -- the turnaround (`pippo sample`'s work) -------------------------------------------------------------

@dataclass(frozen=True)
class SampleRequest:
    """One turnaround: the checkpoint, the photo, the output GIF and the orbit/sampler knobs
    (the option names of `pippo sample`, which its error messages quote)."""
    checkpoint: str
    image: str
    out: str
    views: int = 24
    elevation: float = 10.0         # degrees above the head
    radius: float = 2.2             # metres, the capture dome's
    steps: int = 30
    guidance: float = 2.0
    gamma: float = 1.0
    seed: int = 0
    resolution: int | None = None   # None: the stage's training resolution


@dataclass(frozen=True)
class SampleOutputs:
    views: Path                     # view00.png ..., cameras.json
    mp4: Path | None                # None where no MP4 encoder is available
    gif: Path


def _check_args(req: SampleRequest, model_cfg, side: int) -> None:
    from pippo_model.config import MAX_TOKENS_PER_VIEW

    unit = model_cfg.vae_downsample * model_cfg.patch_size
    check_resolution(side, unit, "--resolution", at_most=unit * math.isqrt(MAX_TOKENS_PER_VIEW))
    if req.views < 1:
        raise UserError(f"--views {req.views}: at least 1 view")
    if not 1 <= req.steps <= model_cfg.timesteps:
        raise UserError(f"--steps {req.steps} must lie in [1, {model_cfg.timesteps}]")
    if req.radius <= 0:
        raise UserError(f"--radius {req.radius} must be > 0 metres")


def sample_turnaround(req: SampleRequest) -> SampleOutputs:
    import torch

    from pipelines.training.engine import to_model_space
    from pipelines.weights import load_autoencoder, load_final_model, run_config
    from pippo_common.redact import redact
    from pippo_model.diffusion import conditions

    paths = output_paths(req.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model, model_cfg = load_final_model(req.checkpoint, device)
    except FileNotFoundError:           # its message speaks of init_from, the training option
        raise UserError(f"--checkpoint {redact(req.checkpoint)}: no complete checkpoint there (a run "
                        "directory, its final/, or a .safetensors with model.json beside it)") from None
    model = model.to(dtype)
    run_cfg = run_config(req.checkpoint)
    side = req.resolution or trained_shape(model_cfg, run_cfg)[1]
    _check_args(req, model_cfg, side)
    stage = stage_of(model_cfg)
    n_train = train_tokens(model_cfg, run_cfg)

    autoencoder = load_autoencoder(model_cfg, device)     # the checkpoint's vae_path: fail before the work
    reference, crop = reference_crop(read_photo(req.image), side)
    cams = orbit_cameras(req.views, side, req.elevation, req.radius)
    cond = conditions(to_model_space(pixel_conditions(model_cfg, reference, cams), autoencoder, device, dtype))
    log.info("%s model, %d views at %d px (elevation %.1f deg, radius %.2f m), %d DDIM steps, guidance %.2f",
             stage, req.views, side, req.elevation, req.radius, req.steps, req.guidance)
    x, info = sample_views(model, cond, req.views, side, steps=req.steps, guidance=req.guidance,
                           seed=req.seed, gamma=req.gamma, n_train=n_train, device=device)
    with torch.no_grad():       # one view at a time: a VAE decoder's activations dwarf the latents
        pixels = torch.cat([autoencoder.decode(v[None].float()) for v in x]).clamp(-1, 1)
    frames = ((pixels + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()

    meta = {"checkpoint": redact(req.checkpoint), "stage": stage, "image": redact(req.image), "crop": crop,
            "views": req.views, "resolution": side, "elevation_deg": req.elevation, "radius_m": req.radius,
            "fov_deg": FOV_DEG, "steps": req.steps, "guidance": req.guidance, "seed": req.seed,
            "gamma": info["gamma"], "n_train_tokens": n_train, "views_per_pass": info["chunk"]}
    write_views(frames, reference, cams, paths["views"], meta)
    mp4 = write_mp4(frames, paths["mp4"])
    write_gif(frames, paths["gif"])
    return SampleOutputs(views=paths["views"], mp4=paths["mp4"] if mp4 else None, gif=paths["gif"])
