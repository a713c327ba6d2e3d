"""`pippo model info` and `pippo eval reprojection` (SPEC §2), plus the file-side helpers of
pippo_model: model configs from YAML and checkpoints from object stores."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from pippo_common.errors import UserError
from pippo_common.config import load_config

log = logging.getLogger("pippo.weights")


def load_model_config(path, overrides=()):
    """configs/models/*.yaml (+ key=value overrides) -> pippo_model.config.ModelConfig."""
    from pippo_model.config import ModelConfig

    return load_config(ModelConfig, path, overrides)


# Where weights may come from. A model.json (and so its vae_path) is read from a run directory
# that someone else may write: http(s) goes through dataprep.inputs.safe_fetch (public addresses only,
# redirects checked, sizes capped), object stores through fsspec with the operator's credentials,
# local paths as they are; any other scheme or an fsspec chain (`a::b`) is refused.
WEIGHT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "memory")
HTTP_WEIGHT_FILES = ("config.json", "diffusion_pytorch_model.safetensors")  # never the pickled .bin
MAX_WEIGHTS_BYTES = 2 << 30        # held in memory by http_get; the SDXL VAE is 335 MB
WEIGHTS_TIMEOUT_S = 600.0          # http_get's deadline is per whole body, not per read


def read_model_json(url: str):
    """A checkpoint's model.json -> ModelConfig, checked like a config file (regular file, size
    cap, every key and type, the sizes' bounds of ModelConfig): one ConfigError line otherwise."""
    from pippo_common.config import ConfigError, from_dict, read_json_config
    from pippo_model.config import ModelConfig

    raw = read_json_config(url, "model.json")
    if not isinstance(raw, dict):
        raise ConfigError(f"{url}: a model.json is a JSON object, got {type(raw).__name__}")
    return from_dict(ModelConfig, raw, source=str(url))


def fetch_directory(uri: str, cache: str | Path | None = None, http=None) -> Path:
    """A local directory for `uri` (a path, file://, an object-store URL such as s3://, or an
    http(s) URL of a diffusers directory); remote directories are copied once into `cache`
    (default ~/.cache/pippo) keyed by the URI. `http` (dataprep.build_config.HttpConfig, default:
    public addresses only) is the policy of http(s) fetches."""
    import hashlib

    from dataprep.inputs.sources import is_chained
    from pippo_common.storage import fs_and_path, is_local

    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    if is_chained(uri) or "\0" in uri or scheme not in ("file", "http", "https", *WEIGHT_STORES):
        raise UserError(f"weights {_shown(uri)}: only local paths, http(s) and object stores "
                        f"({', '.join(WEIGHT_STORES)}) are allowed, not chained URLs or other schemes")
    if scheme == "file":
        local = Path(fs_and_path(uri)[1])
        if not local.is_dir():
            raise UserError(f"checkpoint directory {_shown(uri)} does not exist")
        return local
    target = _private_cache_root(cache) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if _verified(target):
        return target
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))   # 0700, ours alone
    try:
        if scheme in ("http", "https"):
            _fetch_http_directory(uri, tmp, http)
        else:
            fs, root = fs_and_path(uri)
            if is_local(fs) or not fs.isdir(root):
                raise UserError(f"checkpoint directory {_shown(uri)} does not exist")
            fs.get(root.rstrip("/") + "/", str(tmp), recursive=True)
        (tmp / MANIFEST).write_text(json.dumps(_digests(tmp), sort_keys=True))   # checked on every reuse
        shutil.rmtree(target, ignore_errors=True)     # a copy an older version left unfinished
        try:
            os.replace(tmp, target)                   # whole or not at all
        except OSError:
            if not _verified(target):                  # else: a concurrent fetch placed it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


MANIFEST = ".complete"     # {file name: sha256} of a finished copy, written last


def _private_cache_root(cache) -> Path:
    """The per-user weights cache (~/.cache/pippo): a directory we own that nobody else can write
    (a shared or group-writable cache could have been pre-planted); created 0700."""
    import stat

    root = Path(cache or Path.home() / ".cache" / "pippo")
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise UserError(f"weights cache {root}: must be a directory owned by this user and writable by "
                        f"nobody else (it is mode {stat.S_IMODE(st.st_mode):o}, owner uid {st.st_uid})")
    return root


def _digests(directory: Path) -> dict[str, str]:
    import hashlib

    out = {}
    for f in sorted(directory.iterdir()):
        if f.name == MANIFEST:
            continue
        if f.is_symlink() or not f.is_file():
            raise UserError(f"weights cache entry {f}: not a regular file")
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[f.name] = h.hexdigest()
    return out


def _verified(target: Path) -> bool:
    """A finished cached copy whose files still match the digests recorded when it was fetched
    (anything else is fetched again)."""
    try:
        if target.is_symlink() or not (target / MANIFEST).is_file():
            return False
        recorded = json.loads((target / MANIFEST).read_text())
        if recorded == _digests(target):
            return True
    except (OSError, ValueError, UserError):
        pass
    log.warning("weights cache %s does not match the digests recorded when it was fetched; fetching again", target)
    return False


def _fetch_http_directory(uri: str, into: Path, http) -> None:
    """The files of a diffusers AutoencoderKL directory over http(s), through the data side's
    guarded fetch (dataprep.inputs.safe_fetch): the address policy, redirects, deadline and size cap."""
    from dataprep.build_config import HttpConfig
    from dataprep.inputs.photos import Rejected
    from dataprep.inputs.safe_fetch import http_get

    for name in HTTP_WEIGHT_FILES:
        url = uri.rstrip("/") + "/" + name
        try:
            body = http_get(url, http or HttpConfig(timeout_s=WEIGHTS_TIMEOUT_S), MAX_WEIGHTS_BYTES)
        except Rejected as exc:
            raise UserError(f"weights {_shown(url)}: {exc.reason}") from None
        (into / name).write_bytes(body)


def _shown(uri: str, limit: int = 120) -> str:
    from pippo_common.redact import redact_text

    text = redact_text(str(uri))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_autoencoder_for(cfg, device="cpu"):
    """The autoencoder of a model config: the VAE at cfg.vae_path (local or object store), or
    the identity in pixel space."""
    from pippo_model.autoencoder import PixelSpace, load_autoencoder

    if cfg.space == "pixel":
        return PixelSpace()
    if not cfg.vae_path:
        raise UserError("model config has space=latent but no vae_path (a diffusers AutoencoderKL directory)")
    return load_autoencoder(fetch_directory(cfg.vae_path), device=device)


def model_info(args) -> int:
    from pippo_model.flops import parameter_counts, training_flops_per_sample

    cfg = load_model_config(args.config, args.overrides)
    params = parameter_counts(cfg)
    flops = training_flops_per_sample(cfg)
    if args.json:
        print(json.dumps({"params": params, "flops_per_sample": flops}))
        return 0
    print(f"model {cfg.name}: dim {cfg.dim}, depth {cfg.depth}, heads {cfg.heads}, {cfg.space} space, "
          f"{cfg.resolution} px, {cfg.views} views ({cfg.tokens_per_view} tokens per view)")
    for name, n in params.items():
        print(f"  {name:<18} {n:>15,d}  ({n / 1e6:,.1f} M)")
    print(f"  training FLOPs per sample: {flops:.4g} ({flops / 1e12:.3f} TFLOP)")
    return 0


def read_views(directory: str | Path):
    """DIR/cameras.json ({"views": [{K, R, t, height, width}]}) and DIR/view00.png, ... ->
    (list of (H, W, 3) uint8 images, list of camera dicts), validated against each other."""
    import numpy as np

    from dataprep.inputs.image_formats import PHOTO_FORMATS, FormatError, open_image

    directory = Path(directory)
    meta = directory / "cameras.json"
    if not meta.is_file():
        raise UserError(f"{meta} not found (expected cameras.json and view00.png, view01.png, ...)")
    try:
        views = json.loads(meta.read_text())["views"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{meta}: not a {{'views': [...]}} document ({exc})") from None
    images, cameras = [], []
    for i, view in enumerate(views):
        try:
            cam = {"K": np.asarray(view["K"], np.float64), "R": np.asarray(view["R"], np.float64),
                   "t": np.asarray(view["t"], np.float64).reshape(3)}
            size = (int(view["height"]), int(view["width"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{meta}: view {i} needs K (3x3), R (3x3), t (3), height, width ({exc})") from None
        if cam["K"].shape != (3, 3) or cam["R"].shape != (3, 3):
            raise UserError(f"{meta}: view {i}: K and R must be 3x3")
        path = directory / f"view{i:02d}.png"
        if not path.is_file():
            raise UserError(f"{path} not found: cameras.json lists {len(views)} views")
        try:   # only the photo formats: never Pillow's pick from the bytes (PostScript, ...)
            with open_image(path.read_bytes(), PHOTO_FORMATS) as im:
                image = np.asarray(im.convert("RGB"))
        except FormatError as exc:
            raise UserError(f"{path}: {exc.reason}") from None
        except Exception as exc:   # PIL raises OSError, SyntaxError, DecompressionBombError, ...
            raise UserError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None
        if image.shape[:2] != size:
            raise UserError(f"{path} is {image.shape[1]}x{image.shape[0]} but cameras.json says "
                            f"{size[1]}x{size[0]}")
        images.append(image)
        cameras.append(cam)
    if len(images) < 2:
        raise UserError(f"{meta}: at least 2 views are needed, got {len(images)}")
    return images, cameras


def eval_reprojection(args) -> int:
    from pippo_model.metrics.reprojection import NotMeasurable, reprojection_error

    images, cameras = read_views(args.dir)
    try:
        result = reprojection_error(images, cameras)
    except NotMeasurable as exc:
        # A measurement with no number is still an answer (e.g. generated views too inconsistent
        # to match): the document with nulls and the reason, exit 0; scripts test re_pct for null.
        doc = {"re_pct": None, "re_px": None, "pairs": 0, "reason": str(exc)}
        print(json.dumps(doc) if args.json else f"reprojection error: not measurable: {exc}")
        return 0
    except ValueError as exc:
        raise UserError(f"{args.dir}: {exc}") from None
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    h, w = images[0].shape[:2]
    print(f"reprojection error: {result.re_pct:.3f}% of max(H, W) = {result.re_px:.3f} px "
          f"over {result.pairs} view pairs ({len(images)} views, {w}x{h})")
    for (i, j), err in sorted(result.per_pair.items()):
        print(f"  view{i:02d} - view{j:02d}: {err:.3f} px, {result.matches[(i, j)]} matches")
    return 0
