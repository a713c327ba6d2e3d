"""The training-data loader: dataset versions (`URI@REF`) -> batches of the SPEC quantities.

    config           LoaderConfig, DataSource: plain dataclasses (no torch: a training config
                     names them, and reading a config must not load the data stack)
    splits           the held-out split (samples and cameras) by a stable hash of names
    decode           one shard sample -> the per-sample arrays of a stage (pretrain, mid, post)
    training_loader  TrainingLoader: positions, splitting over ranks/workers, state, batches
                     (its docstring is the batch contract)

`TrainingLoader`, `collate` and `STAGE_KIND` are imported on first use (PEP 562), so
`from dataprep.loader import LoaderConfig` never imports torch, cv2 or webdataset.
"""
from __future__ import annotations

from dataprep.loader.config import DataSource, LoaderConfig
from dataprep.loader.splits import held_out, holdout_set, split_name

_LAZY = ("TrainingLoader", "STAGE_KIND", "collate")

__all__ = ["DataSource", "LoaderConfig", "held_out", "holdout_set", "split_name", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        from dataprep.loader import training_loader
        return getattr(training_loader, name)
    raise AttributeError(f"module 'dataprep.loader' has no attribute {name!r}")
