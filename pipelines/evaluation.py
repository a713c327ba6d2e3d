"""The evaluation step: a trained stage's checkpoint on the held-out samples of its dataset version.

    checkpoint + dataset  ->  held-out frames at held-out cameras (dataprep.loader.heldout_batch)
                          ->  DDIM with classifier-free guidance (pippo_model.sampler.ddim_sample)
                          ->  metrics vs the ground-truth views  ->  one MLflow run (SPEC §7)

Held out = never trained on: the loader holds frames out by a hash of what they are (capture and
frame, not where they were read from) and, with `holdout_cameras` > 0, the same cameras of every
frame; the same fractions as the training stage select exactly what that stage never saw (checked
against the run's run.json when the checkpoint is a run directory or its final/; a stage trained
with the stand-in VAE is decoded with the same one).

Metrics (all means over generated target views, images in [-1, 1]):
    eval/psnr, eval/ssim      fidelity to the ground-truth view at the same camera: held-out frames,
                              at held-out cameras when the stage held cameras out
    eval/psnr_seen, _ssim_seen  the same at held-out cameras of frames the stage trained on
                              (novel views of seen frames; only with holdout_cameras > 0)
    eval/psnr_wrong_camera    mid, post: the same samples (same noise) generated at the held-out camera
                              turned `wrong_camera_deg` about the vertical through the head, scored
                              against the TRUE camera's view: the camera-conditioning control; a
                              model that ignores its camera scores the same as eval/psnr
    eval/re_pct               reprojection error of the GENERATED views under their true cameras
                              (pippo_model.metrics.reprojection), % of the image side; the mean over
                              every pair measured in every sample (mid, post: pretrain has 1 view)
    eval/re_pct_gt            the same on the ground-truth views: the metric's noise floor at this
                              resolution and on these cameras; re_pct is read against it
    eval/re_pct_same_pairs, eval/re_pct_gt_same_pairs  both on the pairs measured in both
    eval/re_pairs(_gt)        pairs measured. A pair is measured only when its matches pass the
                              matcher's significance test, so views with no consistent
                              correspondence (an untrained model's noise) measure no pair: re_pct is
                              then NaN ("not measurable"), never a number made of chance matches.
                              Views under `match_upscale_below` px are matched upscaled x2 (SIFT finds
                              too few keypoints on small views; the GT floor at 96 px is measurable so)
    eval/fid                  only with >= fid_min_samples generated images (Fréchet distance of
                              features; the default extractor is a fixed random conv net: compare
                              runs of this pipeline with it, not published FIDs)
"""
from __future__ import annotations

import io
import logging
import math
import dataclasses
from dataclasses import asdict, dataclass

import numpy as np
import torch

from pippo_common.checks import check_resolution
from pipelines.weights import stage_of

log = logging.getLogger("pippo.eval")


@dataclass
class EvalConfig:                 # typed: pippo_common.config.load_config / from_dict
    checkpoint: str               # a trained stage: run dir, its final/, or .safetensors (resolve_weights)
    dataset: str                  # URI@REF of the version the stage trained on
    holdout_fraction: float = 0.1  # must equal the training stage's data.holdout_fraction
    holdout_cameras: float | None = None  # None: the training stage's data.holdout_cameras (run.json)
    wrong_camera_deg: float = 90.0  # azimuth turn of the camera-conditioning control
    match_upscale_below: int = 128  # views smaller than this are matched at 2x (RE)
    samples: int = 4              # held-out samples to generate
    views: int = 4                # target views per sample (mid, post; pretrain: 1)
    resolution: int = 64
    steps: int = 20               # DDIM steps
    guidance: float = 2.0         # CFG scale (1 = no guidance)
    seed: int = 0
    fid_min_samples: int = 64     # FID only when at least this many generated images
    experiment: str = "pippo"
    vae_standin_seed: int | None = None  # TESTS ONLY: the random VAE a latent test stage trained with
    face_views: int = 0           # post: target slots that carry the camera's face crop
    batch_size: int = 4           # samples generated at once
    fid_extractor: str | None = None  # "module:callable" (N,3,H,W) [-1,1] -> (N,D); None = random conv
    run_name: str | None = None   # MLflow run name (default "eval-{stage}")

    def __post_init__(self):
        if "@" not in self.dataset:
            self.dataset = f"{self.dataset}@latest"
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError("holdout_fraction must lie in (0, 1): held-out samples are what is evaluated")
        if self.holdout_cameras is not None and not 0.0 <= self.holdout_cameras < 1.0:
            raise ValueError("holdout_cameras must lie in [0, 1)")
        if min(self.samples, self.views, self.steps, self.batch_size) < 1 or self.resolution < 8:
            raise ValueError("samples, views, steps and batch_size must be >= 1 and resolution >= 8")
        if self.guidance <= 0 or self.face_views < 0 or self.fid_min_samples < 2:
            raise ValueError("guidance must be > 0, face_views >= 0, fid_min_samples >= 2")


def run_eval(cfg: EvalConfig, parent_run_id: str | None = None) -> dict:
    """Evaluate `cfg.checkpoint`; one MLflow run tagged pippo.step=eval (a child of
    `parent_run_id` when given). Returns the eval/* metrics, "run_id", "stage", "samples"."""
    from pippo_common.storage import absolute_url
    from pippo_common.config import flatten, to_dict
    from pipelines.tracking import RunTracker
    from pipelines.weights import load_final_model, run_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = absolute_url(cfg.checkpoint.rstrip("/"))
    model, model_cfg = load_final_model(checkpoint, device)
    stage = stage_of(model_cfg)
    trained = run_config(checkpoint)
    cfg = check_against_training(cfg, trained)
    check_resolution(cfg.resolution, model_cfg.vae_downsample * model_cfg.patch_size)
    with RunTracker(cfg.experiment, cfg.run_name or f"eval-{stage}", step_tag="eval", parent_run_id=parent_run_id,
                    system_metrics=False, tags={"pippo.checkpoint": checkpoint, "pippo.eval_stage": stage}) as run:
        loader, pixel, seen = _heldout(cfg, stage)
        run.log_params({**flatten(to_dict(cfg)), "stage": stage, "checkpoint_url": checkpoint,
                        **{f"model.{k}": v for k, v in flatten(asdict(model_cfg)).items()}})
        version = loader.versions[0]["id"]
        if trained.get("dataset") and trained["dataset"].rsplit("@", 1)[-1] != version:
            log.warning("evaluating on version %s, but the stage trained on %s", version, trained["dataset"])
        run.log_dataset(cfg.dataset, version, name=cfg.dataset.rsplit("/", 1)[-1].split("@")[0], context="evaluation")
        generated = generate(model, model_cfg, pixel, cfg, device)
        metrics = evaluate(generated, pixel, cfg, stage)
        if seen is not None:
            seen_metrics = evaluate(generate(model, model_cfg, seen, cfg, device), seen, cfg, "pretrain")
            metrics.update({f"{k}_seen": v for k, v in seen_metrics.items() if k in ("eval/psnr", "eval/ssim")})
        if stage != "pretrain":
            wrong = wrong_camera_batch(pixel, cfg.wrong_camera_deg,
                                       [loader.anchor_axis_m(int(i)) for i in pixel["_source"]])
            metrics["eval/psnr_wrong_camera"] = _psnr(generate(model, model_cfg, wrong, cfg, device), pixel)
        run.log_metrics(metrics, step=0)
        run.log_image(contact_sheet(pixel["reference"], pixel["views"], generated), "eval/contact_sheet.png")
        log.info("eval of %s (%s, %d held-out samples): %s", checkpoint, stage, len(pixel["keys"]),
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return {**metrics, "run_id": run.run_id, "stage": stage, "samples": len(pixel["keys"]),
            "dataset_version": version, "checkpoint": checkpoint}


# -- inputs --------------------------------------------------------------------------------------------

def check_against_training(cfg: EvalConfig, trained: dict) -> EvalConfig:
    """A holdout_fraction or holdout_cameras other than the stage's would evaluate on training
    samples or cameras (or skip some it never saw): an error; holdout_cameras None takes the
    stage's. A latent stage trained with the stand-in VAE is decoded by the same
    one unless told otherwise."""
    if cfg.holdout_cameras is None:        # the stage's own cameras held out (0 when it held none)
        cfg = dataclasses.replace(cfg, holdout_cameras=float(trained.get("data", {}).get("holdout_cameras") or 0.0))
    for name in ("holdout_fraction", "holdout_cameras"):
        value = trained.get("data", {}).get(name)
        if value is not None and not math.isclose(float(value), getattr(cfg, name)):
            raise ValueError(f"{name} {getattr(cfg, name)} differs from the training stage's data.{name} "
                             f"{value}: the held-out set would not be what that stage never saw")
    if cfg.vae_standin_seed is None and trained.get("vae_standin_seed") is not None:
        return dataclasses.replace(cfg, vae_standin_seed=trained["vae_standin_seed"])
    return cfg


def _heldout(cfg: EvalConfig, stage: str):
    """(loader, pixel batch of the held-out frames, of seen frames or None): views at held-out
    cameras (at their true cameras, _K/_R/_t/_head, when no camera is held out)."""
    from dataprep.loader import DataSource, LoaderConfig, TrainingLoader

    data = LoaderConfig(batch_size=cfg.batch_size, num_workers=0, resolution=cfg.resolution,
                        views=1 if stage == "pretrain" else cfg.views,
                        face_views=cfg.face_views if stage == "post" else 0,
                        augment=False, holdout_fraction=cfg.holdout_fraction,
                        holdout_cameras=cfg.holdout_cameras, seed=cfg.seed)
    loader = TrainingLoader([DataSource(cfg.dataset)], stage, data)
    seen = loader.heldout_batch(cfg.samples, frames="seen") if cfg.holdout_cameras and stage != "pretrain" else None
    return loader, loader.heldout_batch(cfg.samples), seen


def turn_camera(R: np.ndarray, t: np.ndarray, centre: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """The camera (R, t) moved `degrees` in azimuth about the vertical (world z, SPEC §4) through
    `centre`, still looking at what it looked at turned the same way: c' = centre + Rz (c - centre),
    R' = R Rzᵀ, t' = -R' c'."""
    a = math.radians(degrees)
    Rz = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    c = -R.T @ t
    c2 = centre + Rz @ (c - centre)
    R2 = R @ Rz.T
    return R2, -R2 @ c2


def wrong_camera_batch(pixel: dict, degrees: float, axis_m: list[float]) -> dict:
    """The batch with every target's conditioning (camera "_R", "_t", whose camera vectors
    `to_model_space` makes; Plücker map and anchor when present) from its camera turned
    `degrees` about the head (`turn_camera`); views unchanged."""
    from dataprep.studio.anchors import draw_anchor
    from dataprep.studio.geometry import plucker, resize_intrinsics

    out = {k: v for k, v in pixel.items() if k != "cameras"}
    R, t = pixel["_R"].numpy().copy(), pixel["_t"].numpy().copy()
    K, head = pixel["_K"].numpy(), pixel["_head"].numpy()
    res = pixel["views"].shape[-1]
    for b in range(R.shape[0]):
        for v in range(R.shape[1]):
            R[b, v], t[b, v] = turn_camera(R[b, v], t[b, v], head[b, :, 3], degrees)
    out["_R"], out["_t"] = torch.from_numpy(R), torch.from_numpy(t)
    if "plucker" in pixel:
        gh, gw = pixel["plucker"].shape[-2:]
        out["plucker"] = torch.from_numpy(np.stack([np.stack([
            plucker(resize_intrinsics(K[b, v], gw / res, gh / res), R[b, v], t[b, v], gh, gw)
            for v in range(R.shape[1])]) for b in range(R.shape[0])])).to(pixel["plucker"].dtype)
        anchors = np.stack([np.stack([draw_anchor(K[b, v], R[b, v], t[b, v], res, res, head[b], axis_m[b]).image
                                      for v in range(R.shape[1])]) for b in range(R.shape[0])])
        out["anchor"] = torch.from_numpy(anchors).float() / 127.5 - 1.0
    return out


# -- generation ----------------------------------------------------------------------------------------

@torch.no_grad()
def generate(model, model_cfg, pixel: dict, cfg: EvalConfig, device) -> torch.Tensor:
    """Generated target views (B, V, 3, R, R) in [-1, 1] on the CPU: DDIM (eta 0) with CFG over
    the model's learned nulls, `cfg.batch_size` samples at a time, decoded by the stage's VAE."""
    from pipelines.training.engine import to_model_space
    from pipelines.weights import load_autoencoder
    from pippo_model.diffusion import CosineSchedule, conditions
    from pippo_model.sampler import ddim_sample

    autoencoder = load_autoencoder(model_cfg, device, cfg.vae_standin_seed)
    schedule = CosineSchedule(model_cfg.timesteps).to(device)
    dtype = next(model.parameters()).dtype
    out = []
    n = len(pixel["keys"])
    for k, start in enumerate(range(0, n, cfg.batch_size)):
        chunk = {key: v[start:start + cfg.batch_size] for key, v in pixel.items() if torch.is_tensor(v)}
        batch = to_model_space(chunk, autoencoder, device, dtype)
        g = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + k)
        x = ddim_sample(model, schedule, conditions(batch), tuple(batch["views"].shape), steps=cfg.steps,
                        eta=0.0, guidance=cfg.guidance, clip=1.0 if model_cfg.space == "pixel" else None,
                        generator=g)
        b, v = x.shape[:2]
        images = autoencoder.decode(x.reshape(b * v, *x.shape[2:]).float()).clamp(-1, 1)
        out.append(images.reshape(b, v, *images.shape[1:]).cpu())
    return torch.cat(out)


# -- metrics -------------------------------------------------------------------------------------------

def _psnr(generated: torch.Tensor, pixel: dict) -> float:
    from pippo_model.metrics.image import psnr

    return psnr(generated.flatten(0, 1), pixel["views"].float().flatten(0, 1)).mean().item()


def evaluate(generated: torch.Tensor, pixel: dict, cfg: EvalConfig, stage: str) -> dict:
    """eval/* metrics of generated views against the held-out batch (module docstring)."""
    from pippo_model.metrics.image import ssim

    gt = pixel["views"].float()
    flat_gen, flat_gt = generated.flatten(0, 1), gt.flatten(0, 1)
    metrics = {"eval/psnr": _psnr(generated, pixel), "eval/ssim": ssim(flat_gen, flat_gt).mean().item()}
    if stage != "pretrain":
        upscale = 2 if gt.shape[-1] < cfg.match_upscale_below else 1
        per_pair = {}
        for suffix, views in (("", generated), ("_gt", gt)):
            per_pair[suffix] = reprojection(views, pixel, upscale)
            metrics[f"eval/re_pct{suffix}"] = _re_pct(per_pair[suffix].values(), gt)
            metrics[f"eval/re_pairs{suffix}"] = float(len(per_pair[suffix]))
        same = sorted(set(per_pair[""]) & set(per_pair["_gt"]))
        for suffix in ("", "_gt"):
            metrics[f"eval/re_pct{suffix}_same_pairs"] = _re_pct([per_pair[suffix][p] for p in same], gt)
    if len(flat_gen) >= cfg.fid_min_samples:
        metrics["eval/fid"] = fid_score(flat_gt, flat_gen, cfg.fid_extractor)
    return metrics


def sample_cameras(pixel: dict, s: int) -> tuple[list[int], list[dict]]:
    """Distinct target slots of sample s and their cameras. A view delivered twice (a sample with
    fewer views than asked repeats them) would pair with itself at zero baseline: kept once."""
    slots, seen = [], set()
    for v, (index, face) in enumerate(zip(pixel["_view_index"][s].tolist(), pixel["_face"][s].tolist())):
        if (index, face) not in seen:
            seen.add((index, face))
            slots.append(v)
    cams = [{"K": pixel["_K"][s, v].numpy(), "R": pixel["_R"][s, v].numpy(), "t": pixel["_t"][s, v].numpy()}
            for v in slots]
    return slots, cams


def _re_pct(errors, views: torch.Tensor) -> float:
    """Mean RE in % of the image side; NaN when no pair was measured."""
    errors = list(errors)
    return 100.0 * float(np.mean(errors)) / max(views.shape[-2:]) if errors else float("nan")


def reprojection(views: torch.Tensor, pixel: dict, upscale: int = 1) -> dict:
    """{(sample, view i, view j): RE in pixels} of views (B, V, 3, R, R) under the batch's true
    cameras, every pair measured in any sample (each weighs the same in a mean, as within one
    set of views); empty when no pair is measurable."""
    from pippo_model.metrics.reprojection import UpscaledMatcher, WideBaselineMatcher, reprojection_error

    matcher = UpscaledMatcher(WideBaselineMatcher(), upscale) if upscale > 1 else WideBaselineMatcher()
    errors = {}
    for s in range(views.shape[0]):
        slots, cams = sample_cameras(pixel, s)
        if len(slots) < 2:
            continue
        try:
            result = reprojection_error([views[s, v] for v in slots], cams, matcher)
        except ValueError:                     # no pair of this sample measurable
            continue
        errors.update({(s, slots[i], slots[j]): e for (i, j), e in result.per_pair.items()})
    return errors


def random_features(seed: int = 0, size: int = 64):
    """A fixed, seeded random conv net -> 64-d features of images resized to size x size (the
    Inception weights of standard FID are not available offline). Random conv features still
    separate image distributions; the numbers compare runs of this pipeline, not papers."""
    g = torch.Generator().manual_seed(seed)
    widths = [3, 16, 32, 64]
    weights = [torch.randn(o, i, 4, 4, generator=g) / math.sqrt(i * 16) for i, o in zip(widths, widths[1:])]

    def extract(images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        for w in weights:
            x = torch.relu(torch.nn.functional.conv2d(x, w, stride=2, padding=1))
        return x.mean(dim=(2, 3))

    return extract


def fid_score(real: torch.Tensor, fake: torch.Tensor, extractor: str | None) -> float:
    """Fréchet distance (Heusel et al. 2017) of real vs generated images under the extractor."""
    import importlib

    from pippo_model.metrics.fid import fid

    if extractor:
        module, _, name = extractor.partition(":")
        fn = getattr(importlib.import_module(module), name)
    else:
        fn = random_features()
    return fid(real.split(64), fake.split(64), fn)


# -- the contact sheet ---------------------------------------------------------------------------------

def contact_sheet(reference: torch.Tensor, gt: torch.Tensor, generated: torch.Tensor, tile: int = 256) -> bytes:
    """PNG: one row per sample, reference | ground-truth views | generated views; tiles larger
    than `tile` pixels are shrunk (a 1K turnaround would make a sheet of hundreds of megapixels)."""
    from PIL import Image

    def fit(x: torch.Tensor) -> torch.Tensor:
        if max(x.shape[-2:]) <= tile:
            return x.float()
        return torch.nn.functional.interpolate(x.float(), size=(tile, tile), mode="area")

    ref, gt, gen = fit(reference), fit(gt.flatten(0, 1)).unflatten(0, gt.shape[:2]), \
        fit(generated.flatten(0, 1)).unflatten(0, generated.shape[:2])
    rows = [torch.cat([ref[i], *gt[i], *gen[i]], dim=-1) for i in range(len(gen))]
    image = ((torch.cat(rows, dim=-2) + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# -- the turnaround strip (the demo's last picture) ----------------------------------------------------

def turnaround_strip(cfg: EvalConfig, out_path: str, views_per_pass: int = 4) -> dict:
    """PNG strip of the first held-out FRAME seen from every camera of its rig in azimuth order:
    the generated row over the ground-truth row at the same cameras, held-out cameras (never seen in
    training) marked by a red bar over their tile. Generated `views_per_pass` views at a time (the
    joint view count the stage trained near), each pass from the same reference and seed.
    Returns {"path", "psnr" (all cameras), "psnr_heldout_cameras", "views"}."""
    import os
    import tempfile

    from PIL import Image

    from dataprep.loader import DataSource, LoaderConfig, TrainingLoader
    from pipelines.weights import load_final_model, run_config
    from pippo_common.storage import absolute_url

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = absolute_url(cfg.checkpoint.rstrip("/"))
    model, model_cfg = load_final_model(checkpoint, device)
    stage = stage_of(model_cfg)
    if stage == "pretrain":
        raise ValueError("a turnaround needs a camera-conditioned stage (mid or post), not pretrain")
    cfg = check_against_training(cfg, run_config(checkpoint))
    data = LoaderConfig(batch_size=1, num_workers=0, resolution=cfg.resolution, views=cfg.views, augment=False,
                        holdout_fraction=cfg.holdout_fraction, holdout_cameras=cfg.holdout_cameras, seed=cfg.seed)
    loader = TrainingLoader([DataSource(cfg.dataset)], stage, data)
    pixel = loader.heldout_batch(1, targets="orbit")
    with_views = [k for k, v in pixel.items() if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == cfg.views
                  and k != "reference"]
    chunks = []
    for start in range(0, cfg.views, views_per_pass):
        part = {k: (v[:, start:start + views_per_pass] if k in with_views else v) for k, v in pixel.items()}
        chunks.append(generate(model, model_cfg, part, cfg, device))
    generated = torch.cat(chunks, dim=1)
    from pippo_model.metrics.image import psnr

    per_view = psnr(generated[0], pixel["views"][0].float())
    is_held = pixel["_heldout_camera"][0].bool()

    def row(x: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(x), dim=-1)

    top, bottom = row(generated[0]), row(pixel["views"][0].float())
    bar = torch.full((3, max(2, cfg.resolution // 24), top.shape[-1]), -1.0)
    for v in range(cfg.views):
        if is_held[v]:
            bar[:, :, v * cfg.resolution:(v + 1) * cfg.resolution] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    image = torch.cat([bar, top, bottom], dim=-2)
    pixels = ((image + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".png.tmp")      # atomic: never a half-written PNG
    with os.fdopen(fd, "wb") as f:
        Image.fromarray(pixels).save(f, format="PNG")
    os.replace(tmp, out_path)
    return {"path": out_path, "views": cfg.views, "key": pixel["keys"][0], "stage": stage,
            "psnr": per_view.mean().item(),
            "psnr_heldout_cameras": per_view[is_held].mean().item() if bool(is_held.any()) else float("nan")}

