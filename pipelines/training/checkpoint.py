"""Checkpoints of a training run on any fsspec URL (local path, s3://, ...).

Layout under the run's URI (StageConfig.run_uri()):

    run.json                        {"mlflow_run_id", "stage", "config"}: written once, read on resume
    step_00000100/ds/...            DeepSpeed's sharded save (every rank's own files)
    step_00000100/loader/rank00000.json   the loader's position of each rank
    step_00000100/ema/rank00000.safetensors   each rank's EMA slices (pipelines.training.ema)
    step_00000100/trainer.json      step, samples, world size, ZeRO stage, EMA updates
    step_00000100/latest            "ds": DeepSpeed's tag file, so its tools (zero_to_fp32) need no --tag
    step_00000100/COMPLETE          the marker, written LAST (after a barrier behind every rank's upload)
    latest                          {"step", "dir"}: pointer to the newest complete step, after its marker
    final-step_00000100/model.safetensors   consolidated EMA weights (+ model_raw.safetensors: the
    final-step_00000100/model.json  trained weights, no EMA), the model config, info.json (step,
                                    loss, sha256 of model.safetensors), then COMPLETE

A final directory is an output: once COMPLETE it is never rewritten. Training a run further (more
`steps`: the run's name leaves steps out, so it resumes) writes another one, named by its step, so
everything that consumed the earlier weights still finds them unchanged. Runs written before this
layout have a single `final/`; it is read like the others (its step from its info.json).

A step directory without its COMPLETE marker is never loaded: a crash during a save leaves the
previous checkpoint as the newest complete one (if `latest` is missing or points at a directory
without a marker, the newest complete step directory is found by listing). DeepSpeed writes to a
node-local directory and each rank uploads only the files it wrote, so the same code serves a
shared filesystem and an object store. Loading: the node's local rank 0 downloads the step into a
node-local cache; when the world size changed, it converts the checkpoint to DeepSpeed's
*universal checkpoint* (`deepspeed.checkpoint.ds_to_universal`), which the engine then loads with
`checkpoint.load_universal` — any ZeRO stage, any number of workers.
DeepSpeed's own files are torch pickles. Nothing proves that this run wrote the ones it finds
(anyone who can write the run directory could plant one), so they are only ever loaded with
`weights_only=True` and an allow-list of DeepSpeed's few state types (pipelines.training.safe_load),
the universal conversion included (run in this process under the same guard), after checking that
the step directory holds regular files only. Downloads and conversions go to a private scratch
directory this process creates (mkdtemp, mode 0700) and removes after the load: a predictable shared
path in /tmp could be pre-planted. The consolidated weights handed to other stages and users are
safetensors (loading them never unpickles).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pippo_common.errors import DataError
from pippo_common.storage import absolute_url, atomic_write_bytes, fs_and_path, is_local
from pipelines.training.safe_load import UnsafeCheckpointError, unsafe_globals, verify_tree, weights_only_loads

log = logging.getLogger("pippo.train.checkpoint")

DS_TAG = "ds"
DS_LATEST = "latest"        # in a step directory: DeepSpeed's tag file, holding DS_TAG
UNIVERSAL_TAG = "universal"
MARKER = "COMPLETE"
# DeepSpeed's ds_to_universal needs this key in the client state of ZeRO-1/2 checkpoints.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
STEP_DIR = re.compile(r"step_\d{8}")
FINAL_DIR = re.compile(r"final(-step_\d{8})?")      # final-step_NNNNNNNN; "final": runs of older versions
LEGACY_FINAL = "final"
# Caps on the small files of a run (JSON records, per-rank loader states, EMA slices) and on the
# consolidated weights: a name that is /dev/zero or a FIFO must not hang or exhaust memory.
MAX_JSON_BYTES = 16 << 20
MAX_RANK_FILE_BYTES = 64 << 30
MAX_WEIGHTS_BYTES = 256 << 30


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def final_name(step: int) -> str:
    return f"final-{step_name(step)}"


def is_final_dir(url: str) -> bool:
    """Whether `url` names a stage's consolidated output (final-step_N/, or an older run's final/)."""
    return bool(FINAL_DIR.fullmatch(posixpath.basename(url.rstrip("/"))))


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
        return json.loads(read_capped(self.fs, self.path(*parts), MAX_JSON_BYTES))

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
            if not (isinstance(pointer.get("dir"), str) and STEP_DIR.fullmatch(pointer["dir"])):
                # a pointer out of the run (`..`, an absolute path) is never followed
                log.warning("%s: `latest` names %r, not a step directory of this run; listing",
                            self.uri, str(pointer.get("dir"))[:100])
            elif self.exists(pointer["dir"], MARKER):
                return {**self.read_json(pointer["dir"], "trainer.json"), "dir": pointer["dir"]}
            else:
                log.warning("%s: `latest` points at %s, which has no %s marker; listing", self.uri, pointer["dir"], MARKER)
        except (FileNotFoundError, KeyError, AttributeError, json.JSONDecodeError):
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
            # DeepSpeed's own tag file, so its tools read a step directory as they read any
            # DeepSpeed save (`python -m deepspeed.utils.zero_to_fp32 step_00000100 out`, no --tag).
            # Before the marker: a complete step always has it.
            atomic_write_bytes(self.url(name, DS_LATEST), DS_TAG.encode())
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
    def load_into(self, engine, resume: dict, world_size: int, local_rank: int) -> None:
        """Load a complete step into `engine` (optimizer and scheduler states included). The engine
        must have been created with `checkpoint.load_universal` iff the world size changed. Every
        DeepSpeed file is loaded weights-only (safe_load); a file that needs another type is refused
        with UnsafeCheckpointError, before any of its code could run."""
        name = resume["dir"]
        if not STEP_DIR.fullmatch(str(name)):
            raise CheckpointError(f"{self.uri}: {str(name)[:100]!r} is not a step directory")
        universal = resume["world_size"] != world_size
        scratch = node_scratch(local_rank) if universal or not self.local else None
        try:
            if self.local:
                source = Path(self.path(name))
            else:                         # node-local rank 0 downloads into the private scratch
                source = scratch / "step"
                if local_rank == 0:
                    self.fs.get(self.path(name).rstrip("/") + "/", str(source), recursive=True)
                barrier()
            if local_rank == 0:
                verify_tree(source / DS_TAG)
            barrier()
            load_dir, tag = source, DS_TAG
            if universal:
                if local_rank == 0:
                    to_universal(source / DS_TAG, scratch / UNIVERSAL_TAG)
                barrier()
                load_dir, tag = scratch, UNIVERSAL_TAG
            with weights_only_loads():
                path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load {self.url(name)}")
        finally:
            barrier()
            if scratch is not None and local_rank == 0:
                shutil.rmtree(scratch, ignore_errors=True)

    def verify_step(self, name: str) -> None:
        """On the driver, before any worker starts: step `name` holds regular files only and every
        DeepSpeed file in it needs no type outside the allow-list (static scan, nothing runs).
        Raises UnsafeCheckpointError naming the first offending file."""
        if not STEP_DIR.fullmatch(str(name)):
            raise CheckpointError(f"{self.uri}: {str(name)[:100]!r} is not a step directory")
        if self.local:
            verify_tree(Path(self.path(name)))
        self.fs.invalidate_cache()
        for path, info in sorted(self.fs.find(self.path(name, DS_TAG), detail=True).items()):
            if info.get("type") != "file":
                raise UnsafeCheckpointError(f"refused checkpoint entry {path}: not a file")
            if not path.endswith(".pt"):
                continue
            with self.fs.open(path, "rb") as f:
                bad = unsafe_globals(f)
            if bad:
                raise UnsafeCheckpointError(
                    f"refused checkpoint file {self.url(posixpath.relpath(path, self.root))}: it needs "
                    f"{', '.join(bad[:3])}, not a type DeepSpeed checkpoints hold")

    def read_rank_files(self, name: str, folder: str) -> list[bytes]:
        """Every rank's file in `name/folder/`, in rank order."""
        self.fs.invalidate_cache()
        paths = sorted(p for p in self.fs.ls(self.path(name, folder), detail=False))
        return [read_capped(self.fs, p, MAX_RANK_FILE_BYTES) for p in paths]

    # -- the consolidated model (immutable outputs) ------------------------------------------------
    def finals(self) -> dict[int, str]:
        """{step: directory name} of every COMPLETE final of this run. An older run's `final/`
        counts at the step its info.json names (a non-integer there: not a final)."""
        self.fs.invalidate_cache()
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return {}
        found: dict[int, str] = {}
        for name in sorted(n for n in names if FINAL_DIR.fullmatch(n)):
            if not self.exists(name, MARKER):
                continue
            if name == LEGACY_FINAL:
                try:
                    step = self.read_json(name, "info.json").get("step")
                except (FileNotFoundError, ValueError, AttributeError, CheckpointError):
                    continue
                if not isinstance(step, int) or isinstance(step, bool):
                    continue
                found.setdefault(step, name)      # a final-step_N of the same step wins
            else:
                found[int(name[len("final-step_"):])] = name
        return found

    def final_at(self, step: int) -> str | None:
        """The directory name of the COMPLETE final trained to exactly `step`, or None."""
        return self.finals().get(step)

    def check_steps(self, steps: int, resume: dict | None) -> None:
        """Refuse, in one line, to "train" a run to fewer steps than it already has (unless that
        very step's final exists): returning the longer run's weights would be a silent lie."""
        if resume is None or resume["step"] <= steps or self.final_at(steps):
            return
        have = sorted(self.finals())
        raise CheckpointError(
            f"{self.uri} is already trained to step {resume['step']}; steps={steps} is fewer "
            f"(finals at steps: {', '.join(map(str, have)) or 'none'}): ask for steps>={resume['step']}, "
            f"one of those steps, or a new run_name")

    def write_final(self, weights: dict[str, torch.Tensor], raw: dict[str, torch.Tensor] | None,
                    model_config: dict, info: dict, step: int) -> str:
        """Write final-step_{step}/ (COMPLETE last) and return its URL. A COMPLETE one is never
        touched again: it is refused here (CheckpointError); debris without a marker is replaced."""
        import hashlib

        from safetensors.torch import save

        name = final_name(step)
        if self.exists(name, MARKER):
            raise CheckpointError(f"{self.url(name)} is complete and immutable: not rewritten")
        if self.exists(name):
            self.fs.rm(self.path(name), recursive=True)      # a crashed write, never read
        meta = {"format": "pt", "pippo.model": json.dumps(model_config)}
        data = save(_contiguous(weights), metadata=meta)
        # the content's identity, recorded once here (the bytes are in memory): the workflow's
        # cache keys of downstream steps use it instead of re-reading gigabytes
        info = {**info, "weights_sha256": hashlib.sha256(data).hexdigest(), "weights_bytes": len(data)}
        atomic_write_bytes(self.url(name, "model.safetensors"), data)
        if raw is not None:
            atomic_write_bytes(self.url(name, "model_raw.safetensors"), save(_contiguous(raw), metadata=meta))
        self.write_json(model_config, name, "model.json")
        self.write_json(info, name, "info.json")
        atomic_write_bytes(self.url(name, MARKER), b"ok\n")
        return self.url(name)


def _contiguous(state: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


class CheckpointError(DataError):
    """A run directory whose contents cannot be what this pipeline wrote (one line, never retried)."""


def read_capped(fs, path: str, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (a FIFO, a device or a directory
    behind the name is refused, never opened)."""
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise
    if is_local(fs):
        import stat
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"{path}: not a regular file")
    elif info.get("type") != "file":
        raise CheckpointError(f"{path}: not a file")
    size = int(info.get("size") or 0)
    if size > limit:
        raise CheckpointError(f"{path}: {size} bytes, more than the {limit} allowed")
    with fs.open(path, "rb") as f:
        data = f.read(size)          # the listed size, not the cap: read(n) allocates n bytes
        grew = f.read(1)
    if grew:
        raise CheckpointError(f"{path}: grew while it was read (more than its {size} listed bytes)")
    return data


def node_scratch(local_rank: int) -> Path:
    """A private directory (mkdtemp: mode 0700, a name nobody could predict) created by this
    node's local rank 0; the other ranks of the node learn its path through the process group.
    Never a shared well-known path: whatever is found there could have been planted."""
    mine = tempfile.mkdtemp(prefix="pippo-ckpt-") if local_rank == 0 else None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Path(mine)
    entries = [None] * dist.get_world_size()
    dist.all_gather_object(entries, (socket.gethostname(), os.getpid() if mine else None, mine))
    host = socket.gethostname()
    paths = [p for h, _, p in entries if h == host and p]
    if len(paths) != 1:
        raise RuntimeError(f"expected one local rank 0 on {host}, found {len(paths)}")
    return Path(paths[0])


def to_universal(ds_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's converter (`ds_to_universal`), run in this process with one worker for each
    phase (so it forks no pools) under the weights-only loader: the files it reads are as untrusted
    as the ones the engine loads. Its progress prints go to the debug log, not stdout."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    verify_tree(ds_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(ds_dir), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    printed = io.StringIO()
    try:
        with weights_only_loads(), contextlib.redirect_stdout(printed):
            ds_to_universal.main(args)
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"ds_to_universal failed on {ds_dir}: {type(exc).__name__}: {exc}") from exc
    finally:
        log.debug("ds_to_universal: %s", printed.getvalue()[-4000:])
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log.info("converted %s to a universal checkpoint (world size changed)", ds_dir)


# -- finding a previous stage's weights (stage handoff) ---------------------------------------------

def resolve_weights(uri: str) -> tuple[str, str | None]:
    """`init_from` -> (URL of model.safetensors, URL of its model.json or None). Accepts a run
    directory (its newest complete final), a final directory, or a .safetensors file."""
    uri = absolute_url(uri.rstrip("/"))
    fs, path = fs_and_path(uri)
    if path.endswith(".safetensors"):
        cfg = posixpath.join(posixpath.dirname(uri), "model.json")
        return uri, cfg if fs.exists(posixpath.join(posixpath.dirname(path), "model.json")) else None
    bases = [uri]
    if not is_final_dir(uri):
        finals = CheckpointStore(uri).finals()
        bases += [posixpath.join(uri, finals[s]) for s in sorted(finals, reverse=True)]
        bases.append(posixpath.join(uri, LEGACY_FINAL))   # an older run's final/ without a readable info.json
    for base in bases:
        _, p = fs_and_path(base)
        if fs.exists(posixpath.join(p, MARKER)) and fs.exists(posixpath.join(p, "model.safetensors")):
            return posixpath.join(base, "model.safetensors"), posixpath.join(base, "model.json")
    raise FileNotFoundError(f"init_from {uri}: no complete final checkpoint (model.safetensors + {MARKER}) there")


def weights_identity(uri: str) -> str:
    """sha256 of the model.safetensors that `uri` resolves to (run dir, final dir, file): the
    identity of a checkpoint's content. The digest its final's info.json recorded at write time
    is used when the file still has the recorded size (finals are immutable: no one rewrites
    them); otherwise — an older run, a bare file — the bytes are hashed."""
    import hashlib

    weights, _ = resolve_weights(uri)
    fs, path = fs_and_path(weights)
    size = int(fs.info(path).get("size") or 0)
    info_path = posixpath.join(posixpath.dirname(path), "info.json")
    try:
        info = json.loads(read_capped(fs, info_path, MAX_JSON_BYTES))
        digest = info.get("weights_sha256") if isinstance(info, dict) else None
        if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) and info.get("weights_bytes") == size:
            return digest
    except (FileNotFoundError, ValueError, CheckpointError):
        pass
    if size > MAX_WEIGHTS_BYTES:
        raise CheckpointError(f"{weights}: {size} bytes, more than the {MAX_WEIGHTS_BYTES} allowed")
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_safetensors(url: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    fs, path = fs_and_path(url)
    return load(read_capped(fs, path, MAX_WEIGHTS_BYTES))
