"""The typed config of a workflow (`pippo pipeline run CONFIG`): named steps forming a DAG.

    name: demo
    experiment: pippo-demo                  # MLflow experiment (default: name)
    steps:
      data:     {kind: synth, params: {captures: 2, photos: 48}}
      dataprep: {kind: dataprep, config: configs/datasets/demo.yaml,
                 overrides: {sources: [{kind: captures, uri: "${steps.data.captures}"}, ...]}}
      pretrain: {kind: train, config: configs/stages/pretrain.yaml,
                 overrides: {dataset: "${steps.dataprep}", steps: 60}}
      mid:      {kind: train, config: configs/stages/mid.yaml,
                 overrides: {dataset: "${steps.dataprep}", init_from: "${steps.pretrain}"}}

A string anywhere in a step's overrides may name another step's output: `${steps.NAME}` (the
whole output: a version `URI@id`, a checkpoint URI) or `${steps.NAME.FIELD}` (a field of a dict
output). Those references ARE the DAG's edges (plus `after:` for order without data).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from dataprep.names import validate_name
from pippo_common.config import FILE_PATH, FILE_PATH_KEYS

STEP_REF = re.compile(r"\$\{steps\.([A-Za-z0-9_-]+)(?:\.([A-Za-z0-9_]+))?\}")
STEP_TAGS = {"synth": "dataprep", "dataprep": "dataprep", "train": None, "eval": "eval"}


@dataclass
class StepConfig:
    kind: Literal["synth", "dataprep", "train", "eval"]
    # the step's own YAML (build config, stage config); relative to the pipeline file
    config: str | None = field(default=None, metadata=FILE_PATH)
    # merged over the YAML (nested keys); a train step's model/deepspeed paths written here are
    # relative to the pipeline file too
    overrides: dict[str, Any] = field(default_factory=dict,
                                      metadata={FILE_PATH_KEYS: ("model", "deepspeed")})
    params: dict[str, Any] = field(default_factory=dict)      # synth: captures, cameras, frames, photos...
    after: list[str] = field(default_factory=list)            # extra ordering edges
    enabled: bool = True

    def __post_init__(self):
        if self.kind in ("dataprep", "train") and not self.config:
            raise ValueError(f"a {self.kind} step needs `config` (a YAML path)")


@dataclass
class PipelineConfig:
    name: str
    steps: dict[str, StepConfig]
    experiment: str | None = None
    store: str = "${PIPPO_STORE}"              # step records live under {store}/pipelines/{name}/
    workdir: str = "out/pipelines"             # synth outputs: {workdir}/{name}/{step}/

    def __post_init__(self):
        # both become path segments: {store}/pipelines/{name}/steps/{step}/, {workdir}/{name}/{step}-...
        validate_name(self.name, "pipeline name")
        for name in self.steps:
            validate_name(name, "step name")
        for name, step in self.steps.items():
            for dep in self.dependencies(name):
                if dep not in self.steps:
                    raise ValueError(f"step {name!r} refers to unknown step {dep!r}")
        self.order()                               # raises on a cycle

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name

    def dependencies(self, name: str) -> list[str]:
        step = self.steps[name]
        refs = {m.group(1) for m in STEP_REF.finditer(repr(step.overrides))}
        return sorted(refs | set(step.after))

    def order(self) -> list[str]:
        """Steps in a topological order (stable: declaration order among ready steps)."""
        done: list[str] = []
        pending = list(self.steps)
        while pending:
            ready = [s for s in pending if all(d in done for d in self.dependencies(s))]
            if not ready:
                raise ValueError(f"steps form a cycle: {', '.join(pending)}")
            done.append(ready[0])
            pending.remove(ready[0])
        return done
