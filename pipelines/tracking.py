"""MLflow tracking (SPEC §7) for training, workflow, eval and compare: one run per step; in
training, called from rank 0 only.

Everything goes through an explicit MlflowClient + run id (not mlflow's global "active run"), so a
parent run and its child can be open in one process, and the trainer never waits on HTTP for
per-step metrics: they are queued and sent in batches by one background thread.
"""

from __future__ import annotations

import atexit
import functools
import io
import json
import logging
import os
import queue
import re
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from pippo_common.redact import redact, redact_text

log = logging.getLogger("pippo.tracking")

_TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".txt", ".md", ".log", ".csv", ".toml", ".cfg", ".ini"}


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(".pippo").absolute()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


# The driver's reachability check: a few seconds in all, so a wrong or stopped server is one line
# before Ray starts (mlflow's own client retries for minutes, inside every worker).
CHECK_TIMEOUT_S = 4.0
CHECK_RETRIES = 2


def check_tracking_server(uri: str | None = None, *, timeout_s: float = CHECK_TIMEOUT_S,
                          retries: int = CHECK_RETRIES) -> None:
    """One cheap authenticated request to the tracking server (http(s) only: a sqlite or file
    store is local, and nothing is created for it here). A server that does not answer, refuses the credentials or is
    not MLflow is one UserError line naming the (redacted) URI; at most `retries` + 1 tries of
    `timeout_s` each, with a short backoff.

    Deliberately plain `requests` (what mlflow's REST client uses underneath) and not
    mlflow.utils.rest_utils: importing mlflow takes 3-9 s on a busy 2-core machine, more than the
    check itself. The same environment variables as mlflow's client decide auth and TLS."""
    import requests

    from pippo_common.errors import UserError

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    env = os.environ.get
    headers = {"Authorization": f"Bearer {env('MLFLOW_TRACKING_TOKEN')}"} if env("MLFLOW_TRACKING_TOKEN") else {}
    auth = (env("MLFLOW_TRACKING_USERNAME"), env("MLFLOW_TRACKING_PASSWORD") or "") \
        if env("MLFLOW_TRACKING_USERNAME") else None
    verify = False if env("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true" else \
        env("MLFLOW_TRACKING_SERVER_CERT_PATH") or True
    shown = redact_text(uri)
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
    for attempt in range(retries + 1):
        try:
            response = requests.get(url, params={"max_results": 1}, headers=headers, auth=auth, verify=verify,
                                    cert=env("MLFLOW_TRACKING_CLIENT_CERT_PATH"), timeout=timeout_s,
                                    allow_redirects=False)
            break
        except requests.RequestException as exc:
            if attempt == retries:
                raise UserError(f"MLflow tracking server {shown} is not reachable ({_root_reason(exc)}); start "
                                f"it or set MLFLOW_TRACKING_URI (unset = the local sqlite store "
                                f".pippo/mlflow.db)") from None
            time.sleep(0.5 * 2 ** attempt)
    if response.status_code in (401, 403):
        raise UserError(f"MLflow tracking server {shown} refused the credentials (HTTP {response.status_code}); "
                        f"check MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD")
    if response.status_code != 200:
        raise UserError(f"MLflow tracking server {shown} answered HTTP {response.status_code} to a search "
                        f"of experiments: not an MLflow server, or not a working one")


def _root_reason(exc: BaseException) -> str:
    """The innermost cause of a requests/urllib3 error, in a few words ("Connection refused")."""
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__
    text = str(seen) or type(seen).__name__
    if "Connection refused" in text or isinstance(seen, ConnectionRefusedError):
        return "connection refused"
    if "timed out" in text.lower():
        return "timed out"
    return redact_text(" ".join(text.split()))[:200]


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Runs in a local sqlite store keep artifacts beside the db (mlflow would use ./mlruns of
    whatever the cwd is); servers choose their own (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):]).absolute()
    return (db.parent / "mlartifacts" / _safe_name(experiment)).as_uri()


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", name)


def _quiet_mlflow() -> None:
    # "View run ... at" goes to stdout, not through logging; alembic/INFO chatter does.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _as_str(v, limit: int | None = None) -> str:
    """str() of an already redacted value, redacted again: objects (paths, configs) can print
    a URL that redact() could not see inside them. Truncated after redaction."""
    return redact_text(str(v))[:limit]


def _is_local(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file")


class _MetricWriter(threading.Thread):
    """Sends queued metrics with log_batch; a failed batch is reported and dropped so that a
    flaky tracking server never stops training (mlflow's REST client already retries)."""

    def __init__(self, client, run_id: str):
        super().__init__(name="pippo-mlflow-metrics", daemon=True)
        self.client, self.run_id, self.q = client, run_id, queue.Queue()

    def run(self) -> None:
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH
        while True:
            items = [self.q.get()]
            while len(items) < MAX_METRICS_PER_BATCH:  # drain what piled up: one request for all
                try:
                    items.append(self.q.get_nowait())
                except queue.Empty:
                    break
            batch = [m for m in items if m is not None]
            try:
                if batch:
                    self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
            except Exception as e:  # noqa: BLE001 - reported, training goes on
                log.warning("dropped %d metrics for run %s: %s", len(batch), self.run_id, e)
            for _ in items:
                self.q.task_done()
            if any(m is None for m in items):  # end() asked to stop
                return


class RunTracker:
    def __init__(self, experiment: str, run_name: str | None = None, *, step_tag: str,
                 parent_run_id: str | None = None, resume_run_id: str | None = None,
                 system_metrics: bool = True, tags: dict | None = None):
        from mlflow import MlflowClient
        _quiet_mlflow()
        self.uri = tracking_uri()
        self.client = MlflowClient(self.uri)
        self.step_tag, self._ended, self._monitor = step_tag, False, None
        # Names are shown in every MLflow listing: a name built from a secret shows its redacted form.
        experiment = redact_text(experiment)
        run_name = redact_text(run_name) if run_name is not None else None
        run_tags = {**(tags or {}), "pippo.step": step_tag}
        if resume_run_id:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            self.last_logged_step = self._max_logged_step()
            run_tags["pippo.resumed_after_step"] = self.last_logged_step
            self.set_tags(run_tags)
        else:
            self.run_id = self._create_run(experiment, run_name, parent_run_id, run_tags)
            self.last_logged_step = -1
        self._writer = _MetricWriter(self.client, self.run_id)
        self._writer.start()
        if system_metrics:
            self._start_system_metrics(resumed=bool(resume_run_id))
        # Metrics queued by a trainer that exits without end(); bounded: the server may be gone.
        self._atexit = functools.partial(self.flush, 30.0)
        atexit.register(self._atexit)

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException
        if exp := self.client.get_experiment_by_name(name):
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, _artifact_location(self.uri, name))
        except MlflowException:  # another rank/process created it meanwhile
            if exp := self.client.get_experiment_by_name(name):
                return exp.experiment_id
            raise

    def _create_run(self, experiment, run_name, parent_run_id, tags) -> str:
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        # source/user/git tags as mlflow.start_run adds them; redacted: a git remote URL can
        # carry a token.
        tags = {k: _as_str(v) for k, v in redact(resolve_tags(tags)).items()}
        run = self.client.create_run(self._experiment_id(experiment), run_name=run_name, tags=tags)
        return run.info.run_id

    def _max_logged_step(self) -> int:
        """Largest step of any training metric: run.data holds each key's latest (max-step)
        value, so no history scan. system/* metrics count their own steps and are left out."""
        metrics = self.client.get_run(self.run_id).data._metric_objs
        return max((m.step for m in metrics if not m.key.startswith("system/")), default=-1)

    def _start_system_metrics(self, resumed: bool) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed,
                                                 tracking_uri=self.uri)
            self._monitor.start()
        except Exception as e:  # noqa: BLE001 - e.g. psutil missing: training goes on without
            log.warning("system metrics disabled: %s", e)
            self._monitor = None

    # ---- logging -------------------------------------------------------------------------
    def log_params(self, flat: dict) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
        params = {str(k): _as_str(v, MAX_PARAM_VAL_LENGTH) for k, v in redact(_flatten(flat)).items()}
        # A resumed run already has its params; mlflow refuses to change one, so skip those.
        old = self.client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in old and old[k] != v)
        if changed:
            log.warning("params changed since the run started, kept the originals: %s", changed)
        todo = [Param(k, v) for k, v in params.items() if k not in old]
        for i in range(0, len(todo), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=todo[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queues and returns; steps a resumed run already has are dropped (one curve)."""
        from mlflow.entities import Metric
        if step <= self.last_logged_step:
            return
        now = int(time.time() * 1000)
        for k, v in metrics.items():
            self._writer.q.put(Metric(k, float(v), now, int(step)))

    def log_dataset(self, uri: str, version_id: str, name: str, context: str = "training",
                    extra: dict | None = None) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
        uri = redact(str(uri))
        scheme = urlparse(uri).scheme or "local"
        source_type = {"file": "local", "https": "http"}.get(scheme, scheme)
        ds = Dataset(name=name, digest=version_id, source_type=source_type,
                     source=json.dumps({"uri": uri}),
                     profile=json.dumps(redact(extra), default=str) if extra else None)
        self.client.log_inputs(self.run_id, [DatasetInput(ds, [InputTag(MLFLOW_DATASET_CONTEXT,
                                                                        context)])])

    def log_image(self, image, artifact_file: str, step: int | None = None) -> None:
        """PNG bytes or a PIL image; `artifact_file` may hold "{step}", e.g. "samples/{step:06d}.png"."""
        if step is not None:
            artifact_file = artifact_file.format(step=step)
        if not isinstance(image, (bytes, bytearray)):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            image = buf.getvalue()
        self.log_artifact_bytes(bytes(image), artifact_file)

    def log_artifact_bytes(self, data: bytes, artifact_file: str) -> None:
        path = PurePosixPath(artifact_file)
        if path.suffix.lower() in _TEXT_SUFFIXES:  # configs and logs may quote credentials
            data = redact_text(data.decode("utf-8", "replace")).encode()
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / path.name
            local.write_bytes(data)
            parent = str(path.parent)
            self.client.log_artifact(self.run_id, str(local), None if parent == "." else parent)

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH
        items = [RunTag(str(k), _as_str(v, MAX_TAG_VAL_LENGTH)) for k, v in redact(tags).items()]
        self.client.log_batch(self.run_id, tags=items)

    def register_model(self, name: str, source_uri: str) -> str:
        """New version of registered model `name` whose source is the checkpoint's model dir,
        linked to this run; the version also carries the URI as tag "pippo.checkpoint"."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
        source = redact(str(source_uri))
        name = redact_text(name)
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        if _is_local(source) and urlparse(self.uri).scheme in ("http", "https"):
            # A server accepts local sources only inside the run's own artifact dir (its
            # path-traversal guard): point at a small run artifact that names the checkpoint.
            ref = "registered/" + _safe_name(name)
            self.log_artifact_bytes(source.encode(), f"{ref}/checkpoint_uri.txt")
            source = f"runs:/{self.run_id}/{ref}"
        mv = self.client.create_model_version(
            name, source, run_id=self.run_id, await_creation_for=0,
            tags={"pippo.checkpoint": redact(str(source_uri)), "pippo.step": self.step_tag})
        return str(mv.version)

    # ---- lifecycle -----------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> None:
        """Blocks until every queued metric has been sent (or reported as dropped)."""
        q = self._writer.q
        with q.all_tasks_done:
            q.all_tasks_done.wait_for(lambda: not q.unfinished_tasks or not self._writer.is_alive(),
                                      timeout)

    def end(self, status: str = "FINISHED") -> None:
        if self._ended:
            return
        self._ended = True
        atexit.unregister(self._atexit)
        self._writer.q.put(None)
        self.flush()
        if self._monitor is not None:
            self._monitor.finish()  # before the run ends: the monitor polls the run's status
        self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
