"""Checkpoints of a training run on any fsspec URL (local path, s3://, ...).

Layout under the run's URI (StageConfig.run_uri()):

    run.json                        {"mlflow_run_id", "stage", "config"}: written once, read on resume
    step_00000100/ds/...            DeepSpeed's sharded save (every rank's own files)
    step_00000100/loader/rank00000.json   the loader's position of each rank
    step_00000100/ema/rank00000.safetensors   each rank's EMA slices (pipelines.training.ema)
    step_00000100/trainer.json      step, samples, world size, ZeRO stage, EMA updates
    step_00000100/COMPLETE          the marker, written LAST (after a barrier behind every rank's upload)
    latest                          {"step", "dir"}: pointer to the newest complete step, after its marker
    final/model.safetensors         consolidated EMA weights (+ model_raw.safetensors: the trained
    final/model.json                weights, no EMA), the model config, then final/COMPLETE

A step directory without its COMPLETE marker is never loaded: a crash during a save leaves the
previous checkpoint as the newest complete one (if `latest` is missing or points at a directory
without a marker, the newest complete step directory is found by listing). DeepSpeed writes to a
node-local directory and each rank uploads only the files it wrote, so the same code serves a
shared filesystem and an object store. Loading: the node's local rank 0 downloads the step into a
node-local cache; when the world size changed, it converts the checkpoint to DeepSpeed's
*universal checkpoint* (`deepspeed.checkpoint.ds_to_universal`), which the engine then loads with
`checkpoint.load_universal` — any ZeRO stage, any number of workers.
DeepSpeed's own files are torch pickles written by this run; the consolidated weights handed to
other stages and users are safetensors (loading them never unpickles).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dataprep.storage import absolute_url, atomic_write_bytes, fs_and_path, is_local

log = logging.getLogger("pippo.train.checkpoint")

DS_TAG = "ds"
UNIVERSAL_TAG = "universal"
MARKER = "COMPLETE"
# DeepSpeed's ds_to_universal needs this key in the client state of ZeRO-1/2 checkpoints.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def step_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointStore:
    def __init__(self, uri: str):
        self.uri = absolute_url(uri.rstrip("/"))
        self.fs, self.root = fs_and_path(self.uri)
        self.local = is_local(self.fs)

    def url(self, *parts: str) -> str:
        return posixpath.join(self.uri, *parts)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self.path(*parts))

    def read_json(self, *parts: str):
        with self.fs.open(self.path(*parts), "rb") as f:
            return json.loads(f.read())

    def write_json(self, obj, *parts: str) -> None:
        atomic_write_bytes(self.url(*parts), json.dumps(obj, indent=1, sort_keys=True).encode())

    # -- finding the newest complete checkpoint ----------------------------------------------------
    def complete_steps(self) -> list[int]:
        self.fs.invalidate_cache()
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []
        steps = sorted(int(n[5:]) for n in names if n.startswith("step_") and n[5:].isdigit())
        return [s for s in steps if self.exists(step_name(s), MARKER)]

    def latest(self) -> dict | None:
        """trainer.json of the newest COMPLETE step checkpoint (+ "dir"), or None."""
        try:
            pointer = self.read_json("latest")
            if self.exists(pointer["dir"], MARKER):
                return {**self.read_json(pointer["dir"], "trainer.json"), "dir": pointer["dir"]}
            log.warning("%s: `latest` points at %s, which has no %s marker; listing", self.uri, pointer["dir"], MARKER)
        except (FileNotFoundError, KeyError, json.JSONDecodeError):
            pass
        steps = self.complete_steps()
        if not steps:
            return None
        name = step_name(steps[-1])
        return {**self.read_json(name, "trainer.json"), "dir": name}

    # -- saving (collective) ------------------------------------------------------------------------
    def save(self, engine, step: int, rank_files: dict[str, bytes], trainer_state: dict, keep_last: int) -> str:
        """Every rank calls this at the same step. rank_files: {relative path: bytes} this rank adds
        (its loader state, its EMA slices). Returns the step directory's URL."""
        rank = _rank()
        name = step_name(step)
        if rank == 0 and self.exists(name):
            self.fs.rm(self.path(name), recursive=True)   # debris of a save that crashed: never loaded
        barrier()
        with tempfile.TemporaryDirectory(prefix="pippo-ckpt-") as tmp:
            os.makedirs(os.path.join(tmp, DS_TAG), exist_ok=True)
            engine.save_checkpoint(tmp, tag=DS_TAG, client_state=UNIVERSAL_INFO, save_latest=False)
            for rel, data in rank_files.items():
                os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
                Path(tmp, rel).write_bytes(data)
            self._upload(tmp, name)
        barrier()                                          # every rank's files are in place
        if rank == 0:
            self.write_json({**trainer_state, "step": step, "saved": time.time()}, name, "trainer.json")
            atomic_write_bytes(self.url(name, MARKER), b"ok\n")
            self.write_json({"step": step, "dir": name}, "latest")
            self._prune(keep_last)
        barrier()
        return self.url(name)

    def _upload(self, local_dir: str, name: str) -> None:
        for dirpath, _, files in os.walk(local_dir):
            for f in files:
                src = os.path.join(dirpath, f)
                rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
                dst = self.path(name, rel)
                if self.local:
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.move(src, dst)
                else:
                    self.fs.put_file(src, dst)

    def _prune(self, keep_last: int) -> None:
        steps = self.complete_steps()
        for s in steps[:-keep_last] if keep_last < len(steps) else []:
            # marker first: a half-deleted directory must never look complete
            self.fs.rm(self.path(step_name(s), MARKER))
            self.fs.rm(self.path(step_name(s)), recursive=True)

    # -- loading (collective) -------------------------------------------------------------------------
    def local_copy(self, name: str, local_rank: int) -> Path:
        """A node-local directory holding step `name` (downloaded once per node by local rank 0)."""
        if self.local:
            return Path(self.path(name))
        key = hashlib.sha256(self.url(name).encode()).hexdigest()[:16]
        target = Path(tempfile.gettempdir()) / "pippo-ckpt-cache" / key
        if local_rank == 0 and not (target / MARKER).exists():
            # download beside, then rename: an interrupted download never looks complete
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            self.fs.get(self.path(name).rstrip("/") + "/", str(partial), recursive=True)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
        barrier()
        return target

    def load_into(self, engine, resume: dict, world_size: int, local_rank: int) -> None:
        """Load a complete step into `engine` (optimizer and scheduler states included). The engine
        must have been created with `checkpoint.load_universal` iff the world size changed."""
        local = self.local_copy(resume["dir"], local_rank)
        tag = DS_TAG
        if resume["world_size"] != world_size:
            tag = UNIVERSAL_TAG
            target = local if not self.local else _scratch(self.url(resume["dir"]))
            if local_rank == 0 and not (target / UNIVERSAL_TAG / "zero").exists():
                to_universal(local / DS_TAG, target / UNIVERSAL_TAG)
            barrier()
            local = target
        path, _ = engine.load_checkpoint(str(local), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {self.url(resume['dir'])}")

    def read_rank_files(self, name: str, folder: str) -> list[bytes]:
        """Every rank's file in `name/folder/`, in rank order."""
        self.fs.invalidate_cache()
        paths = sorted(p for p in self.fs.ls(self.path(name, folder), detail=False))
        out = []
        for p in paths:
            with self.fs.open(p, "rb") as f:
                out.append(f.read())
        return out

    # -- the consolidated model --------------------------------------------------------------------
    def write_final(self, weights: dict[str, torch.Tensor], raw: dict[str, torch.Tensor] | None,
                    model_config: dict, info: dict) -> str:
        from safetensors.torch import save

        meta = {"format": "pt", "pippo.model": json.dumps(model_config)}
        if self.exists("final"):
            self.fs.rm(self.path("final"), recursive=True)
        atomic_write_bytes(self.url("final", "model.safetensors"), save(_contiguous(weights), metadata=meta))
        if raw is not None:
            atomic_write_bytes(self.url("final", "model_raw.safetensors"), save(_contiguous(raw), metadata=meta))
        self.write_json(model_config, "final", "model.json")
        self.write_json(info, "final", "info.json")
        atomic_write_bytes(self.url("final", MARKER), b"ok\n")
        return self.url("final")


def _contiguous(state: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _scratch(url: str) -> Path:
    return Path(tempfile.gettempdir()) / "pippo-ckpt-cache" / hashlib.sha256(url.encode()).hexdigest()[:16]


def to_universal(ds_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's converter, in a subprocess (it forks its own worker pools)."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ds_dir),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {ds_dir}: {proc.stderr.strip().splitlines()[-1:]}")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log.info("converted %s to a universal checkpoint (world size changed)", ds_dir)


# -- finding a previous stage's weights (stage handoff) ---------------------------------------------

def resolve_weights(uri: str) -> tuple[str, str | None]:
    """`init_from` -> (URL of model.safetensors, URL of its model.json or None). Accepts a run
    directory (its final/), a final/ directory, or a .safetensors file."""
    uri = absolute_url(uri.rstrip("/"))
    fs, path = fs_and_path(uri)
    if path.endswith(".safetensors"):
        cfg = posixpath.join(posixpath.dirname(uri), "model.json")
        return uri, cfg if fs.exists(posixpath.join(posixpath.dirname(path), "model.json")) else None
    for base in (uri, posixpath.join(uri, "final")):
        _, p = fs_and_path(base)
        if fs.exists(posixpath.join(p, MARKER)) and fs.exists(posixpath.join(p, "model.safetensors")):
            return posixpath.join(base, "model.safetensors"), posixpath.join(base, "model.json")
    raise FileNotFoundError(f"init_from {uri}: no complete final/ checkpoint (model.safetensors + {MARKER}) there")


def load_safetensors(url: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    fs, path = fs_and_path(url)
    with fs.open(path, "rb") as f:
        return load(f.read())
