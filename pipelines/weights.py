"""The one model/weights loader (training, eval, sampling and the benches use it): model configs
from YAML, a checkpoint's model.json and run.json (the training stage's config), the trained model
with its attention-biasing N_train, the autoencoder of a model config, and weights directories
fetched from object stores or http(s) into a private, digest-checked cache."""
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


# -- a trained checkpoint -------------------------------------------------------------------------

def stage_of(model_cfg) -> str:
    """The stage a model config was trained as: its conditioning modules (ModelConfig.for_stage)."""
    if model_cfg.control_mlp:
        return "post"
    return "mid" if model_cfg.camera_mlp else "pretrain"


def run_config(checkpoint: str) -> dict:
    """The training stage's config saved in its run's run.json, beside the consolidated final the
    checkpoint names (a run directory, its final/, or final/model.safetensors); {} when there is
    none (a bare .safetensors elsewhere): the resolution, views and holdout the model was really
    trained with. run.json is input (whoever can write the run directory writes it): read like a
    config file, capped and checked (callers check the fields they use, e.g. `trained_shape`)."""
    import posixpath

    from pippo_common.config import ConfigError, read_json_config
    from pippo_common.storage import fs_and_path
    from pipelines.training.checkpoint import is_final_dir, resolve_weights

    weights, _ = resolve_weights(checkpoint)
    final = posixpath.dirname(weights)
    if not is_final_dir(final):
        return {}
    url = posixpath.join(posixpath.dirname(final), "run.json")
    fs, path = fs_and_path(url)
    if not fs.exists(path):
        return {}
    run = read_json_config(url, "run.json")
    config = run.get("config", {}) if isinstance(run, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("data", {}), dict):
        raise ConfigError(f"{url}: not a run.json of pippo train (config.data must be a mapping)")
    return config


def trained_shape(model_cfg, run_cfg: dict) -> tuple[int, int]:
    """(views, resolution) of a training sample: the stage's data.views/data.resolution from
    run.json, else the model config's; bounded like the model config's own fields."""
    from pippo_model.config import INT_BOUNDS

    data = run_cfg.get("data", {})
    shape = []
    for key, fallback in (("views", model_cfg.views), ("resolution", model_cfg.resolution)):
        value = data.get(key) or fallback
        lo, hi = INT_BOUNDS[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise UserError(f"run.json: data.{key} must be an integer in [{lo}, {hi}], got {value!r:.40}")
        shape.append(value)
    return shape[0], shape[1]


def train_tokens(model_cfg, run_cfg: dict) -> int:
    """Tokens of one training sample, reference included (N_train of attention biasing). The model
    config's `views` is a size preset's; the stage's data.views/resolution are what was trained."""
    if model_cfg.attn_n_train:
        return model_cfg.attn_n_train
    views, side = trained_shape(model_cfg, run_cfg)
    per_view = (side // (model_cfg.vae_downsample * model_cfg.patch_size)) ** 2
    return (views + 1) * per_view


def load_final_model(uri: str, device="cpu"):
    """(Pippo in eval mode, ModelConfig) from a training run's newest final (or any init_from form)."""
    import dataclasses

    from pipelines.training.checkpoint import load_safetensors, resolve_weights
    from pippo_model.model import build_model

    weights_url, config_url = resolve_weights(uri)
    cfg = read_model_json(config_url)
    if cfg.attn_n_train is None:
        # N_train of attention biasing is the sequence the stage really trained (its data.views
        # and data.resolution, from run.json), not the size preset's default `views`: with the
        # preset's 4 views a post model trained on 2 was biased only beyond 4 views, and too weakly
        cfg = dataclasses.replace(cfg, attn_n_train=train_tokens(cfg, run_config(uri)))
    model = build_model(cfg)
    model.load_state_dict(load_safetensors(weights_url), strict=True)
    return model.to(device).eval(), cfg


# -- the autoencoder ------------------------------------------------------------------------------

STANDIN_VAE = {"block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8}


def load_autoencoder(model_cfg, device="cpu", standin_seed: int | None = None):
    """The frozen autoencoder of a model config: the identity in pixel space, else the VAE at
    `vae_path` (local dir, object store or http(s)). `standin_seed` (tests only) builds a small
    random VAE when there is no vae_path, and says so."""
    import math

    import torch

    from pippo_common.config import ConfigError
    from pippo_model.autoencoder import AutoencoderKL, PixelSpace
    from pippo_model.autoencoder import load_autoencoder as load_vae

    if model_cfg.space == "pixel":
        return PixelSpace()
    if model_cfg.vae_path:
        return load_vae(fetch_directory(model_cfg.vae_path), device=device)
    if standin_seed is None:
        raise ConfigError("the model is latent-space (space: latent) but has no vae_path: set it (a stage's "
                          "model_overrides.vae_path) to a diffusers AutoencoderKL directory or URI")
    log.warning("USING A RANDOM STAND-IN VAE (vae_standin_seed=%d): for tests only, samples are "
                "meaningless for real data", standin_seed)
    depth = int(math.log2(model_cfg.vae_downsample)) + 1
    cfg = {**STANDIN_VAE, "block_out_channels": STANDIN_VAE["block_out_channels"][:depth],
           "latent_channels": model_cfg.latent_channels, "scaling_factor": model_cfg.vae_scaling_factor}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(standin_seed)
        vae = AutoencoderKL(cfg)
    return vae.requires_grad_(False).eval().to(device)
