"""MLflow lineage of a workflow invocation (SPEC §7): its parent run lists one child run per step
that it reached, whatever happened to the step.

    ran        the step's own run (a training run is named by its config, not the invocation)
    cached     a small run tagged `pippo.cached` pointing at the run that produced the output
    resumed    a train step that continued a training run an earlier invocation started: that
               run's parent is the earlier invocation, so this one gets a small run pointing at it
    failed     the step's own run if it got one (ended FAILED), else a small FAILED run with the error

A step's tags hold its output, cached or not: `pippo.output`, and `pippo.checkpoint` (train) or
`pippo.dataset_version` (dataprep). Under `--resume` the parent already lists the steps the failed
attempt finished: they are not listed a second time.
"""
from __future__ import annotations

import json
import logging

from pipelines.workflow.config import STEP_TAGS

log = logging.getLogger("pippo.workflow")
PARENT = "mlflow.parentRunId"


def step_tag(kind: str, stage: str | None) -> str:
    return STEP_TAGS[kind] or stage or "pretrain"


def output_tags(kind: str, output) -> dict:
    text = output if isinstance(output, str) else json.dumps(output, sort_keys=True)
    tags = {"pippo.output": text[:5000]}
    if kind == "train" and isinstance(output, str):
        tags["pippo.checkpoint"] = output
    if kind == "dataprep" and isinstance(output, str) and "@" in output:
        tags["pippo.dataset_version"] = output.rsplit("@", 1)[1]
    return tags


class Lineage:
    def __init__(self, parent, experiment: str, pipeline: str, resumed: bool):
        self.parent, self.experiment, self.pipeline = parent, experiment, pipeline
        self.client = parent.client
        self.experiment_id = self.client.get_run(parent.run_id).info.experiment_id
        # what the parent lists already (a resumed invocation's earlier attempts)
        self.listed: set = set()
        for run in self.children() if resumed else []:
            tags = run.data.tags
            self.listed |= {run.info.run_id, tags.get("pippo.source_run") or None,
                            (tags.get("pippo.workflow_step"), tags.get("pippo.cache_key"))}

    def children(self, since_ms: int = 0) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], max_results=1000, page_token=token,
                                           filter_string=f"tags.`{PARENT}` = '{self.parent.run_id}' "
                                                         f"and attributes.start_time >= {int(since_ms)}")
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def _child(self, name: str, tag: str, tags: dict, status: str) -> str:
        from pipelines.tracking import RunTracker

        run = RunTracker(self.experiment, f"{self.pipeline}/{name}", step_tag=tag, system_metrics=False,
                         parent_run_id=self.parent.run_id, tags={"pippo.workflow_step": name, **tags})
        run.end(status)
        self.listed |= {run.run_id, (name, tags.get("pippo.cache_key"))}
        return run.run_id

    def cached(self, name: str, kind: str, stage: str | None, record: dict) -> None:
        source = record.get("mlflow_run_id") or None
        if (source and source in self.listed) or (name, record.get("key")) in self.listed:
            log.debug("step %s: already listed under %s", name, self.parent.run_id)
            return
        self._child(name, step_tag(kind, stage), {"pippo.cached": "true", "pippo.source_run": source or "",
                                                  "pippo.cache_key": record.get("key", ""),
                                                  **output_tags(kind, record["output"])}, "FINISHED")

    def ran(self, name: str, kind: str, stage: str | None, record: dict) -> None:
        """After a step ran: a training run that belongs to an earlier invocation gets a row here."""
        run_id = record.get("mlflow_run_id")
        if kind != "train" or not run_id:
            return
        tags = self.client.get_run(run_id).data.tags
        if tags.get(PARENT) == self.parent.run_id:
            self.client.set_tag(run_id, "pippo.workflow_step", name)
            return
        self._child(name, step_tag(kind, stage), {"pippo.resumed_run": run_id, "pippo.source_run": run_id,
                                                  "pippo.cache_key": record.get("key", ""),
                                                  **output_tags(kind, record["output"])}, "FINISHED")

    def failed(self, name: str, kind: str, stage: str | None, since_ms: int, key: str | None, error: str) -> None:
        """List the failed step under the parent: the runs it started in this attempt (steps run
        one at a time, so a child started since the step began is the step's), else a new one."""
        from pippo_common.redact import redact_text

        error = redact_text(error)[:4000]
        mine = [r for r in self.children(since_ms) if r.data.tags.get("pippo.workflow_step") in (None, name)
                and r.info.run_id not in self.listed]
        for run in mine:
            self.client.set_tag(run.info.run_id, "pippo.workflow_step", name)
            self.client.set_tag(run.info.run_id, "pippo.error", error)
            if run.info.status == "RUNNING":   # a training run stays RUNNING for its resume; here it failed
                self.client.set_terminated(run.info.run_id, "FAILED")
        if not mine:
            self._child(name, step_tag(kind, stage), {"pippo.error": error, "pippo.cache_key": key or ""}, "FAILED")
