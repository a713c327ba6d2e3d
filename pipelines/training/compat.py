"""Driver-side checks that a stage can start from what it is given, and the rule that input errors
raised inside Ray Train workers end the run at once.

Before Ray starts (pipelines.training.launcher.resolve_job): `init_from`'s weights must fit this
stage's model (every key of the checkpoint exists in the model with the same shape; keys the
checkpoint lacks belong to modules this stage adds), and a run being resumed must have been
trained as this stage with this model. Both read only small files (model.json, run.json, the
safetensors header), so a mismatch is one line in seconds instead of an error on every worker.

In the workers (pipelines.training.worker.ray_entry): an error that a retry cannot fix (a bad
config, bad data, a missing file) is re-raised as StageInputError; `EndOnInputError`, a Ray Train
UserCallback on the controller, then raises it there. Ray Train's failure policy retries only
worker-group and startup errors, never the controller's own, so the run ends after the first
attempt and the driver prints the worker's line (exit 2). Anything else (a killed worker, a
collective timeout) is retried up to `resources.max_failures` as before.
"""
from __future__ import annotations

import json
import struct

from pippo_common.config import ConfigError
from pippo_common.errors import UserError

# keys of model.json/run.json's model that may differ on resume without changing any tensor
RESUME_FREE_MODEL_KEYS = {"vae_path", "name"}
MAX_SAFETENSORS_HEADER = 100 << 20     # safetensors' own limit on the JSON header


class IncompatibleCheckpoint(ConfigError):
    """A checkpoint that this stage's config cannot start from (one line, exit 2)."""


class StageInputError(UserError):
    """An input error raised in a Ray Train worker, carried as its one-line message only (plain
    and picklable: it crosses from the worker to the controller to the driver)."""

    def __init__(self, message: str):
        super().__init__(message)


def safetensors_shapes(url: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a .safetensors file's header alone. Read by hand (8-byte length +
    JSON, the documented format) because safetensors.safe_open needs a local file, and a
    multi-GB checkpoint on s3:// should not be downloaded to compare names and shapes."""
    from pippo_common.storage import fs_and_path

    fs, path = fs_and_path(url)
    try:
        with fs.open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_SAFETENSORS_HEADER:
                raise IncompatibleCheckpoint(f"{url}: not a safetensors file (header of {size} bytes)")
            header = json.loads(f.read(size))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError):
        raise IncompatibleCheckpoint(f"{url}: not a safetensors file") from None
    if not isinstance(header, dict):
        raise IncompatibleCheckpoint(f"{url}: not a safetensors file")
    try:
        return {k: tuple(int(n) for n in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (TypeError, KeyError, ValueError):
        raise IncompatibleCheckpoint(f"{url}: not a safetensors file (bad tensor entry)") from None


def model_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    """{state-dict key: shape} of the model `model_cfg` builds, on the meta device (no memory)."""
    import torch

    from pippo_model.model import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_init_from(init_from: str, model_cfg, stage: str) -> None:
    """What pippo_model.model.load_stage_weights will demand on every worker, checked here."""
    from pipelines.weights import read_model_json
    from pipelines.training.checkpoint import resolve_weights
    from pippo_model.model import stage_modules

    weights_url, config_url = resolve_weights(init_from)
    source_cfg = read_model_json(config_url) if config_url else None
    have = safetensors_shapes(weights_url)
    want = model_shapes(model_cfg)
    extra = sorted(set(have) - set(want))
    if extra:
        raise IncompatibleCheckpoint(
            f"init_from {init_from}: its weights have tensors this {stage} model lacks ({_few(extra)}): "
            f"a later stage's checkpoint? A stage starts from the same or an earlier stage "
            f"(pretrain -> mid -> post)")
    allowed = stage_modules(model_cfg) - (stage_modules(source_cfg) if source_cfg else set())
    stray = sorted(k for k in set(want) - set(have) if not any(k.startswith(p) for p in allowed))
    if stray:
        raise IncompatibleCheckpoint(
            f"init_from {init_from}: lacks tensors of modules this {stage} model shares with it "
            f"({_few(stray)}): not a checkpoint of this model")
    wrong = [f"{k} {list(have[k])} vs {list(want[k])}" for k in sorted(have) if have[k] != want[k]]
    if wrong:
        raise IncompatibleCheckpoint(
            f"init_from {init_from}: tensor shapes differ from this {stage} model's (checkpoint vs "
            f"model: {_few(wrong, 3)}): model config or model_overrides differ from the run that wrote it")


def check_resume(store, resume: dict | None, stage: str, model: dict) -> None:
    """A run directory that already holds a run must be continued as the same stage and model
    (an explicit run_name or checkpoint.root can point a config at someone else's run)."""
    run = store.read_json("run.json") if store.exists("run.json") else None
    trained_as = (run or {}).get("stage") or (resume or {}).get("stage")
    if trained_as and trained_as != stage:
        raise IncompatibleCheckpoint(
            f"run {store.uri} was trained as {trained_as}; this config is {stage}: a {stage} stage starts "
            f"from it with init_from={store.uri}, in a run of its own (another run_name)")
    old = (run or {}).get("model")
    if isinstance(old, dict):
        # compare as stored: run.json holds JSON (a tuple field reads back as a list)
        model = json.loads(json.dumps(model, default=str))
        changed = sorted(k for k in set(old) | set(model)
                         if k not in RESUME_FREE_MODEL_KEYS and old.get(k) != model.get(k))
        if changed:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {model.get(k)!r}" for k in changed[:4])
            raise IncompatibleCheckpoint(
                f"run {store.uri} was trained with another model config ({shown}); resume it with its "
                f"own config, or train this one as a new run (another run_name)")


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# -- in the workers and on the Ray Train controller -------------------------------------------------

def input_error(exc: BaseException) -> StageInputError | None:
    """`exc` as a StageInputError when a retry cannot fix it: a bad config or checkpoint, bad data,
    a missing file. Network and other OS errors, a killed peer, bugs: None (Ray Train may retry)."""
    from pippo_common.errors import is_user_error, user_error_message
    from pippo_common.redact import redact_text

    if isinstance(exc, StageInputError):
        return exc
    if is_user_error(exc):
        # torch's DataLoader re-raises a loader process's error with that process's whole
        # traceback as the message: its last line is the error itself
        lines = [line for line in (user_error_message(exc) or "").splitlines() if line.strip()]
        return StageInputError(redact_text(lines[-1].strip() if lines else type(exc).__name__))
    return None


def end_on_input_error():
    """An EndOnInputError callback; the class is defined here, lazily: ray.train.v2 is imported
    only when a run starts."""
    from ray.train.v2.api.callback import UserCallback

    class EndOnInputError(UserCallback):
        """Runs on the controller after a worker raised: a StageInputError is raised again here,
        which Ray Train's failure policy never retries (a controller error), ending the run."""

        def after_exception(self, run_context, worker_exceptions):
            for rank in sorted(worker_exceptions):
                cause = getattr(worker_exceptions[rank], "_base_exc", worker_exceptions[rank])
                if isinstance(cause, StageInputError):
                    raise StageInputError(f"{cause} (worker rank {rank})")

    return EndOnInputError()


def find_input_error(error: BaseException | None) -> StageInputError | None:
    """The StageInputError inside Ray Train's result.error (a ControllerError, a WorkerGroupError
    of per-rank errors, their causes), if any."""
    seen, todo = set(), [error]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, StageInputError):
            return exc
        todo += [getattr(exc, name, None) for name in ("controller_failure", "_base_exc", "cause")]
        todo += [exc.__cause__, exc.__context__]
        todo += list((getattr(exc, "worker_failures", None) or {}).values())
    return None
