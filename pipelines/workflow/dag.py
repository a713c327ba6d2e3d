"""Running a workflow: cached, resumable steps on Ray, tracked as one MLflow parent run.

Cache. A step's key = sha256(code version, kind, its normalised config with every `${steps.X}`
replaced by X's output — a dataset version `URI@id`, a checkpoint URI —, and the identity of each
upstream output's content: the sha256 of a checkpoint's weights, a version id (content-addressed
already)). A finished step writes its
record `{store}/pipelines/{name}/steps/{step}/{key}.json` (output, MLflow run id) LAST; a step
whose key has a record is skipped and its output reused. So a no-change re-run does no work, a
changed config re-runs that step and, through the outputs it changes, exactly the steps downstream
of it, and a crash anywhere leaves every finished step recorded. Train steps are themselves
resumable (checkpoints), so re-running a half-trained step continues it; training a stage further
writes a new final (its outputs are immutable), so every earlier record still points at the weights
it was made from. A train record also holds its output's digest: a record whose checkpoint is gone
or differs is not served, the step runs again.

Runs. One MLflow parent run per invocation (tag `pippo.pipeline`); each step a child run
(pipelines.workflow.lineage: cached, resumed and failed steps are listed too). `--resume RUN`
continues a failed invocation's parent run: the finished steps are cached, the failed one runs again.

Why not Ray Workflows: it was removed from Ray (gone in 2.60). Flyte, Dagster and Metaflow cache a
task by a hash of its inputs and code version as well (Flyte's `cache_version` + input literals,
Dagster's code version + data version, Metaflow's `resume` reusing finished steps of a failed run);
here the "inputs" are content ids — dataset versions are content-addressed and checkpoints are
addressed by a hash of their config — so the same idea needs no metadata service beyond the
object store (records) and MLflow (lineage, comparison).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from pippo_common.redact import redact
from pippo_common.versions import code_version, source_digest
from pippo_common.storage import absolute_url, atomic_write_bytes, fs_and_path, join
from pipelines.workflow.config import STEP_REF, PipelineConfig
from pipelines.workflow.lineage import Lineage
from pipelines.workflow.steps import normalised, run_step, step_config

log = logging.getLogger("pippo.workflow")


def substitute(value, outputs: dict):
    """Replace `${steps.NAME[.FIELD]}` in every string by the outputs of finished steps."""
    if isinstance(value, dict):
        return {k: substitute(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, outputs) for v in value]
    if not isinstance(value, str):
        return value

    def one(m):
        out = outputs[m.group(1)]
        if m.group(2):
            if not isinstance(out, dict) or m.group(2) not in out:
                raise ValueError(f"${{steps.{m.group(1)}.{m.group(2)}}}: step {m.group(1)!r} has no such output")
            return str(out[m.group(2)])
        return out if isinstance(out, str) else json.dumps(out)
    whole = STEP_REF.fullmatch(value)
    if whole and not whole.group(2) and not isinstance(outputs[whole.group(1)], str):
        return outputs[whole.group(1)]       # a whole non-string output keeps its type
    return STEP_REF.sub(one, value)


class StepFailed(RuntimeError):
    def __init__(self, step: str, cause: BaseException, run_id: str):
        self.step, self.cause, self.run_id = step, cause, run_id
        text = str(getattr(cause, "cause", None) or cause).strip().splitlines()
        super().__init__(f"step {step!r} failed: {text[-1] if text else type(cause).__name__} — fix it and "
                         f"continue this run with --resume {run_id}")


class Workflow:
    def __init__(self, cfg: PipelineConfig, source: str = "<pipeline>"):
        self.cfg, self.source = cfg, source
        from pippo_common.config import expand_env

        # defaults are not YAML, so ${PIPPO_STORE} in a default is expanded here
        self.root = join(absolute_url(expand_env(cfg.store, source)), "pipelines", cfg.name)
        self.code = source_digest()          # the cache keys' code part
        self.code_version = code_version()    # what records and tags say
        self.workdir = str(Path(cfg.workdir, cfg.name).resolve())
        self._identities: dict[str, str] = {}
        self._stages: dict[str, str] = {}          # train step -> its stage (for the pippo.step tag)
        self._keys: dict[str, str] = {}

    # -- records ------------------------------------------------------------------------------------
    def record_url(self, step: str, key: str) -> str:
        return join(self.root, "steps", step, f"{key}.json")

    def read_record(self, step: str, key: str) -> dict | None:
        fs, path = fs_and_path(self.record_url(step, key))
        try:
            with fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def key(self, name: str, config: dict, inputs: dict | None = None) -> str:
        step = self.cfg.steps[name]
        canon = json.dumps({"code": self.code, "kind": step.kind, "config": config, "inputs": inputs or {}},
                           sort_keys=True, default=str)
        return hashlib.sha256(canon.encode()).hexdigest()[:24]

    def identity(self, name: str, output) -> str:
        """The identity of step `name`'s output content: a train step's the sha256 of the weights
        its checkpoint URI resolves to now; other outputs are content ids already (a dataset
        version id is derived from its manifest) or plain values."""
        if self.cfg.steps[name].kind != "train" or not isinstance(output, str):
            return output if isinstance(output, str) else json.dumps(output, sort_keys=True, default=str)
        if output not in self._identities:
            from pipelines.training.checkpoint import weights_identity

            self._identities[output] = "sha256:" + weights_identity(output)
        return self._identities[output]

    def prepare(self, name: str, outputs: dict):
        """(typed config, normalised dict, cache key) of a step whose upstream outputs are known."""
        step = self.cfg.steps[name]
        overrides = substitute(step.overrides, outputs)
        try:
            cfg = step_config(step.kind, step.config, overrides, step.params)
        except Exception as exc:
            raise type(exc)(f"step {name!r}: {exc}") from None
        config = normalised(step.kind, cfg)
        inputs = {dep: self.identity(dep, outputs[dep]) for dep in self.cfg.dependencies(name) if dep in outputs}
        return cfg, config, self.key(name, config, inputs)

    # -- running --------------------------------------------------------------------------------------
    def run(self, resume: str | None = None) -> dict:
        from pipelines.tracking import RunTracker

        from pipelines.tracking import check_tracking_server

        order = [s for s in self.cfg.order() if self.cfg.steps[s].enabled]
        self.validate(order)
        check_tracking_server()          # before any step: a stopped server is one line, not a hang
        parent = RunTracker(self.cfg.experiment_name, f"{self.cfg.name}", step_tag="pipeline",
                            resume_run_id=resume, system_metrics=False,
                            tags={"pippo.pipeline": self.cfg.name, "pippo.code_version": self.code_version,
                                  "pippo.config_source": self.source})
        log.info("pipeline %s: MLflow run %s (experiment %s); %d steps", self.cfg.name, parent.run_id,
                 self.cfg.experiment_name, len(order))
        outputs: dict = {}
        results: dict = {}
        with parent:
            lineage = Lineage(parent, self.cfg.experiment_name, self.cfg.name, resumed=bool(resume))
            for name in order:
                started_ms = int(time.time() * 1000)
                try:
                    results[name] = self._one(name, outputs, lineage)
                except KeyboardInterrupt:
                    parent.set_tags({"pippo.status": f"interrupted at {name}"})
                    raise KeyboardInterrupt(f"pipeline run {parent.run_id} stopped at step {name!r}; continue it "
                                            f"with --resume {parent.run_id}") from None
                except Exception as exc:
                    failure = StepFailed(name, exc, parent.run_id)
                    log.error("pipeline %s: %s", self.cfg.name, failure)
                    try:
                        lineage.failed(name, self.cfg.steps[name].kind, self._stages.get(name), started_ms,
                                       self._keys.get(name), str(failure))
                    except Exception as lineage_exc:  # noqa: BLE001 - the step's error is the one to report
                        log.warning("step %s: could not list the failure in MLflow: %s", name, lineage_exc)
                    parent.set_tags({"pippo.status": f"failed at {name}"})
                    raise failure from exc
            parent.set_tags({"pippo.status": "succeeded"})
        return {"run_id": parent.run_id, "steps": results}

    def validate(self, order: list[str]) -> None:
        """Load every step's typed config with placeholders for upstream outputs, so a bad config
        fails in one line before the first step runs (not hours later, at its step)."""
        from pippo_common.config import ConfigError

        class Pending(dict):
            def __missing__(self, name):
                return {"captures": f"/pending/{name}", "photos": f"/pending/{name}"} \
                    if self_steps[name].kind == "synth" else f"/pending/{name}@pending"

        self_steps = self.cfg.steps
        for name in order:
            step = self.cfg.steps[name]
            try:
                typed = step_config(step.kind, step.config, substitute(step.overrides, Pending()), step.params)
                if step.kind == "train":
                    self._stages[name] = typed.stage
            except (ConfigError, ValueError, TypeError) as exc:
                raise ConfigError(f"{self.source}: step {name!r}: {exc}") from None

    def _one(self, name: str, outputs: dict, lineage: Lineage) -> dict:
        kind = self.cfg.steps[name].kind
        cfg, config, key = self.prepare(name, outputs)
        self._keys[name] = key                     # a failed step's MLflow row names it
        stage = getattr(cfg, "stage", None)
        record = self.read_record(name, key)
        if record is not None and self._still_valid(name, record):
            outputs[name] = record["output"]
            lineage.cached(name, kind, stage, record)
            log.info("step %s (%s): cached %s -> %s", name, kind, key[:12], _short(record["output"]))
            return {**record, "cached": True}
        log.info("step %s (%s): running (key %s)", name, kind, key[:12])
        start = time.time()
        ctx = {"pipeline": self.cfg.name, "experiment": self.cfg.experiment_name,
               "parent_run_id": lineage.parent.run_id, "workdir": self.workdir, "key": key}
        output, run_id = _execute(kind, name, cfg, ctx)
        # The config as written (secret ${VAR}s back to ${VAR}, URL credentials masked); the
        # output is an identifier read back by later runs, so it is stored as it is.
        record = {"step": name, "kind": kind, "key": key, "output": output, "mlflow_run_id": run_id,
                  "code_version": self.code_version, "config": redact(config), "seconds": round(time.time() - start, 1),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if kind == "train":
            record["output_identity"] = self.identity(name, output)
        atomic_write_bytes(self.record_url(name, key), json.dumps(record, indent=1, sort_keys=True,
                                                                  default=str).encode())
        outputs[name] = output
        lineage.ran(name, kind, stage, record)
        log.info("step %s (%s): done in %.1f s -> %s", name, kind, record["seconds"], _short(output))
        return {**record, "cached": False}

    def _still_valid(self, name: str, record: dict) -> bool:
        """A train record is served only while its checkpoint still holds the weights it recorded
        (someone may have deleted the run, or an older version rewrote final/ in place)."""
        if record.get("kind") != "train":
            return True
        try:
            now = self.identity(name, record["output"])
        except (OSError, ValueError) as exc:
            log.warning("step %s: its cached output %s is unreadable (%s): running it again", name,
                        _short(record["output"]), exc)
            return False
        if now != record.get("output_identity"):
            log.warning("step %s: the weights at %s are not the ones its record names: running it again",
                        name, _short(record["output"]))
            self._identities.pop(record["output"], None)
            return False
        return True


def _execute(kind: str, name: str, cfg, ctx: dict):
    """Run one step as a Ray task (num_cpus=0: it only orchestrates; the build's tasks and Ray
    Train's workers ask for the resources), on the cluster of RAY_ADDRESS or a local Ray."""
    if os.environ.get("PIPPO_WORKFLOW_INPROCESS") == "1":
        return run_step(kind, name, cfg, ctx)
    from pippo_common.ray_start import ensure_ray

    ray = ensure_ray(dashboard=True)
    task = ray.remote(num_cpus=0, max_retries=0)(_step_task)
    return ray.get(task.options(name=f"pippo-step-{name}").remote(kind, name, cfg, ctx))


def _step_task(kind, name, cfg, ctx):
    from pippo_common.logs import setup_worker

    os.dup2(2, 1)      # the driver's stdout carries the command's result; step output goes to stderr
    setup_worker()     # the CLI's format, levels and redaction (Ray keeps worker logs on the cluster)
    return run_step(kind, name, cfg, ctx)


def _short(output, limit: int = 200) -> str:
    text = output if isinstance(output, str) else json.dumps(output, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."
