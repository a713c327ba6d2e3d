"""Helpers shared by the test groups (tests/unit, tests/integration, tests/e2e): ports and HTTP
readiness, building and reading back dataset versions, a hand-written hostile version record, and
the tiny model configs. Test modules import from here, never from each other (importing a test
module re-collects its tests and ties unrelated files together).

Importable because pyproject's [tool.pytest.ini_options] puts tests/ on sys.path."""
from __future__ import annotations

import contextlib
import io
import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

# The smallest pixel-space model the training and sampling paths accept (CPU seconds per step).
TINY_MODEL = {"space": "pixel", "latent_channels": 3, "vae_downsample": 1, "patch_size": 4, "resolution": 32,
              "dim": 32, "depth": 1, "heads": 2, "camera_hidden": 32}
# Two blocks, wider: for tests that compare stages or need a loss that moves in a few steps.
SMALL_MODEL = {**TINY_MODEL, "dim": 64, "depth": 2, "camera_hidden": 64}


@dataclass(frozen=True)
class Version:
    """A built dataset version: the store URI and the version id."""
    uri: str
    id: str

    @property
    def ref(self) -> str:
        """`URI@id`, as `dataset=` and `pippo data show` take it."""
        return f"{self.uri}@{self.id}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return                      # the server answers, even if with an error status
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def stage_cfg(stage, dataset, root, **over):
    """configs/stages/{stage}.yaml at test scale (SMALL_MODEL, 32 px, 4 steps, a checkpoint every 2)."""
    from pipelines.training.launcher import load_stage_config

    data = {"pretrain": {"views": 1, "batch_size": 4}, "mid": {"views": 2, "batch_size": 2},
            "post": {"views": 2, "batch_size": 2, "face_views": 1}}[stage]
    overrides = [f"dataset={dataset}", f"checkpoint.root={root}", "steps=4", "checkpoint.every_steps=2",
                 "tracking.log_every=1", "tracking.sample_every=2", "tracking.sample_steps=2",
                 "tracking.system_metrics=false", f"tracking.experiment=test-{stage}",
                 f"model_overrides={json.dumps(SMALL_MODEL)}", "data.resolution=32", "data.num_workers=1",
                 "data.holdout_fraction=0.3", "optim.warmup_steps=1",   # of 16 frames: none held out w.p. 0.3 %
                 *[f"data.{k}={v}" for k, v in data.items()]]
    overrides += [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in over.items()]
    return load_stage_config(f"configs/stages/{stage}.yaml", overrides)


# -- building and reading versions -----------------------------------------------------------------

PARTITIONS = 4      # build_in / cfg_for: more partitions than the small inputs have shards


def build(dataset, sources, **kw) -> str:
    """run_build over (kind, uri) sources into the dataset at `dataset`; the new version's id."""
    from dataprep.build.job import run_build
    from dataprep.build_config import BuildConfig, ShardLimits, Source

    kw.setdefault("partitions", 3)
    kw.setdefault("shard", ShardLimits(max_samples=5))
    cfg = BuildConfig(dataset=str(dataset), sources=[Source(k, str(u)) for k, u in sources], **kw)
    return run_build(cfg, {})


def cfg_for(store, sources, **kw):
    """The BuildConfig build_in uses: 64 px, plucker stride 4, PARTITIONS partitions, shards of 4."""
    from dataprep.build_config import BuildConfig, ShardLimits, Source

    kw = {"resolution": 64, "plucker_stride": 4, "partitions": PARTITIONS, "shard": ShardLimits(max_samples=4), **kw}
    return BuildConfig(dataset=store.uri, sources=[Source(k, str(u)) for k, u in sources], **kw)


def build_in(store, sources, **kw) -> dict:
    """run_build into a DatasetStore; the new version's record."""
    from dataprep.build.job import run_build

    return store.describe(store.resolve(run_build(cfg_for(store, sources, **kw), {})))


def samples_of(version) -> dict:
    """Every sample of a version read back with stock webdataset: key -> {ext: bytes}."""
    import webdataset as wds

    from pippo_common.storage import register_webdataset_fsspec

    register_webdataset_fsspec()
    urls = [s["url"].removeprefix("file://") for s in version["shards"]]
    out = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        out[sample["__key__"]] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return out


# -- a hand-written version record -------------------------------------------------------------------

VID = "0123456789abcdef0123"


def crafted_dataset(tmp_path, hostile: dict) -> str:
    """A dataset with one version whose record, parts list and part record are valid, except the
    URLs named in `hostile` ({"parts_url" | "part" | "ledger_url" | "shard" | "index": URL}).
    Valid files also lie outside the root, so a reader that followed a URL there would succeed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataprep.store.ledger import PARTS_SCHEMA

    root, outside = tmp_path / "ds", tmp_path / "outside"
    for d in (root / "versions" / VID, root / "parts" / "r", root / "shards" / "r", outside):
        d.mkdir(parents=True, exist_ok=True)
    (root / ".pippo-dataset").write_text(json.dumps({"format": 2}))
    index = pa.table({"key": ["k0"], "kind": ["image"]})
    for base in (root / "shards" / "r", outside):
        pq.write_table(index, base / "s0.index.parquet")
        (base / "s0.tar").write_bytes(b"\0" * 1024)
    ledger = pa.table({"input": ["a.jpg"], "status": ["rejected"], "stage": ["decode"], "reason": ["bad"]})
    shard = {"url": hostile.get("shard", "shards/r/s0.tar"), "index_url": hostile.get("index", "shards/r/s0.index.parquet"),
             "samples": 1, "bytes": 1024, "sha256": "0" * 64, "kind": "image"}
    part = {"shards": [shard], "drops": [], "ledger_url": hostile.get("ledger_url", "parts/r/p0.ledger.parquet")}
    for base in (root / "parts" / "r", outside):
        pq.write_table(ledger, base / "p0.ledger.parquet")
        (base / "p0.json").write_text(json.dumps(part))
    parts = pa.Table.from_pylist([{"part": "p0", "partition": 0, "kind": "ledger", "digest": "d",
                                   "url": hostile.get("part", "parts/r/p0.json"),
                                   "ledger_url": "parts/r/p0.ledger.parquet"}], schema=PARTS_SCHEMA)
    for base in (root / "versions" / VID, outside):
        pq.write_table(parts, base / "parts.parquet")
    record = {"id": VID, "created": "2026-01-01T00:00:00Z", "format": 2, "parent": None, "recipe": "r",
              "samples": 1, "rejected": 1, "partitions": 1, "counts": {}, "stats": {},
              "parts_url": hostile.get("parts_url", f"versions/{VID}/parts.parquet"),
              "stats_url": f"versions/{VID}/stats.json", "preview_url": f"versions/{VID}/preview.png"}
    (root / "versions" / f"{VID}.json").write_text(json.dumps(record))
    return str(root)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """pippo ARGV in this process: (exit code, stdout, stderr)."""
    from pipelines import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def refused(argv: list[str], *expected: str) -> str:
    code, out, err = run_cli(argv)
    lines = [ln for ln in err.splitlines() if ln.startswith("pippo: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err and not out, (code, err[-2000:])
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def crafted_run(root, model: dict, run: dict | None = None, weights: bool = True):
    """A run directory as `pippo train` leaves it (final/ with weights, model.json and COMPLETE;
    run.json), with the given model.json and run.json contents."""
    from safetensors.torch import save_file

    final = root / "final"
    final.mkdir(parents=True)
    tensors = {}
    if weights:
        from pippo_model.config import ModelConfig
        from pippo_model.model import build_model

        tensors = {k: v.contiguous() for k, v in build_model(ModelConfig(**model)).state_dict().items()}
    save_file(tensors, str(final / "model.safetensors"))
    (final / "model.json").write_text(json.dumps(model))
    (final / "COMPLETE").write_text("ok\n")
    if run is not None:
        (root / "run.json").write_text(json.dumps(run))
    return root


def sample_argv(run, photo, out):
    return ["sample", "--checkpoint", str(run), "--image", str(photo), "--out", str(out),
            "--views", "2", "--steps", "1"]


def show(ref: str) -> tuple[int, str, str]:
    from pipelines import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["data", "show", ref, "--json"])
    return code, out.getvalue(), err.getvalue()


AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


def run(capsys, *args):
    """main(args) -> (exit code, stdout, stderr lines)."""
    from pipelines.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def one_line(capsys, *args, code=2):
    got, out, err = run(capsys, *args)
    assert got == code, (got, out, err)
    assert len(err) == 1 and err[0].startswith("pippo"), err
    assert "Traceback" not in err[0]
    return err[0]


def fake_version(root, vid, created="2026-01-01T00:00:00+00:00"):
    """A minimal version record (an empty version: no parts) in the store's format."""
    import pyarrow.parquet as pq

    from dataprep.store.ledger import PARTS_SCHEMA
    from dataprep.store.core import FORMAT, MARKER

    (root / "versions" / vid).mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(json.dumps({"format": FORMAT}))
    pq.write_table(PARTS_SCHEMA.empty_table(), root / "versions" / vid / "parts.parquet")
    (root / "versions" / f"{vid}.json").write_text(json.dumps(
        {"id": vid, "format": FORMAT, "parent": None, "created": created, "samples": 0, "rejected": 0,
         "recipe": "0" * 16, "parts_url": f"versions/{vid}/parts.parquet", "preview_url": f"versions/{vid}/p.png"}))


def jpeg(size=(64, 48), seed=0) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def saved(fmt, mode="RGB", **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (16, 16), 128 if mode in ("L", "F") else (10, 20, 30)).save(buf, fmt, **kw)
    return buf.getvalue()


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
       b"/Helvetica findfont 12 scalefont setfont 0 0 moveto (pwned) show showpage\n%%EOF\n")
