"""Loading DeepSpeed's checkpoint files without unpickling arbitrary objects.

DeepSpeed saves its states with `torch.save` and loads them with `torch.load(weights_only=False)`
(the engine's checkpoint engine, the ZeRO optimizers, the universal converter and loader), so a
`.pt` planted in a run directory by anyone who can write there would run code on every resume.
We do not fork DeepSpeed's loading code; instead, for the duration of a load, `torch.load` is
replaced by a wrapper that forces `weights_only=True` with an explicit allow-list of the few
non-tensor types DeepSpeed stores (found by `torch.serialization.get_unsafe_globals_in_checkpoint`
on ZeRO-0..3 and universal checkpoints). A file that needs anything else is refused with one line
naming the file and the type. Every call site in DeepSpeed goes through the `torch.load` attribute,
so the wrapper covers all of them, including `ds_to_universal` run in this process.

Before anything is unpickled, `verify_tree` also checks that a checkpoint directory holds regular
files only (no symlinks, FIFOs or devices: `/dev/zero` behind a name would hang or exhaust memory).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import stat
import threading
from pathlib import Path

import torch

from pippo_common.errors import DataError

# The non-tensor types DeepSpeed 0.19 writes into model / optimizer / universal states. torch's
# own containers, dtypes, sizes and tensors are allowed by weights_only itself.
ALLOWED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)

# A checkpoint file larger than this is refused (optimizer states of a 10B-parameter model on one
# rank stay far below it); the point is a bound, not a tight fit.
MAX_FILE_BYTES = 1 << 40

_lock = threading.Lock()


class UnsafeCheckpointError(DataError):
    """A checkpoint file that is not what this pipeline writes (refused before it runs code)."""


def _allowed() -> list:
    import importlib

    out = []
    for module, name in ALLOWED_GLOBALS:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):   # another DeepSpeed version: that type is not needed
            continue
    return out


def _needed_type(message: str) -> str:
    """The type torch's weights-only unpickler stopped at, from its message (wording varies by
    torch version: `Unsupported global: GLOBAL x.y` or `unsupported GLOBAL x.y whose module...`)."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    if m:
        return f"`{m.group(1)}`"
    lines = [ln for ln in message.splitlines() if ln.strip() and "weights_only" not in ln]
    return f"an object outside the allow-list ({lines[0][:200]})" if lines else "an object outside the allow-list"


def _name(f) -> str:
    return str(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "<stream>")


@contextlib.contextmanager
def weights_only_loads():
    """Within the block, every `torch.load` is `weights_only=True` with ALLOWED_GLOBALS; a file
    that needs another type raises UnsafeCheckpointError naming it."""
    original = torch.load
    allowed = _allowed()

    def guarded(f, map_location=None, *args, weights_only=None, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            check_regular_file(Path(f))
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, map_location, *args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"refused checkpoint file {_name(f)}: it needs {_needed_type(str(exc))}, which is not a type "
                "DeepSpeed checkpoints hold (checkpoints are loaded with weights_only=True)") from None

    with _lock:                        # one patch at a time; restored even when the load fails
        torch.load = guarded
        try:
            yield
        finally:
            torch.load = original


def check_regular_file(path: Path, limit: int = MAX_FILE_BYTES) -> None:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeCheckpointError(f"refused checkpoint file {path}: not a regular file")
    if st.st_size > limit:
        raise UnsafeCheckpointError(f"refused checkpoint file {path}: {st.st_size} bytes (limit {limit})")


def verify_tree(root: Path) -> None:
    """Every entry under `root` is a directory or a regular file of bounded size (symlinks,
    FIFOs, sockets and devices are refused), so no load can hang or read outside the checkpoint."""
    if os.path.islink(root) or not os.path.isdir(root):
        raise UnsafeCheckpointError(f"refused checkpoint directory {root}: not a directory")
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                raise UnsafeCheckpointError(f"refused checkpoint entry {os.path.join(dirpath, d)}: a symlink")
        for f in filenames:
            check_regular_file(Path(dirpath, f))


def unsafe_globals(f) -> list[str]:
    """The types a torch checkpoint (path or seekable file object) needs beyond torch's own and
    ALLOWED_GLOBALS, found by disassembling its pickle without running it (cheap: the zip's
    directory and its data.pkl are read, not the tensors). Used on the driver to refuse a planted
    file before any worker starts; the weights-only load in the workers stays the guarantee."""
    try:
        with torch.serialization.safe_globals(_allowed()):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    except (ValueError, RuntimeError, EOFError, OSError) as exc:
        return [f"<not a torch.save checkpoint: {type(exc).__name__}>"]
