"""The one code version: what a record, an MLflow tag or a cache key says about the code that
made it.

    package_version()  "pippo-pipeline 0.1.0" (the installed distribution)
    source_digest()    16 hex digits of the project's source and pinned requirements: the
                       workflow's cache keys (pipelines.workflow.dag), so a code change re-runs
                       steps
    code_version()     both, "pippo-pipeline 0.1.0+<digest>": stored in dataset version records,
                       workflow step records and the `pippo.code_version` tag of every MLflow run
"""
from __future__ import annotations

import hashlib
from pathlib import Path

DISTRIBUTION = "pippo-pipeline"
# Every package whose code can change a result. pippo_common counts: the config loader, the
# storage helpers and the redactor shape what a step reads and writes.
CODE_DIRS = ("dataprep", "pippo_model", "pipelines", "cluster", "pippo_common")
ROOT = Path(__file__).resolve().parents[1]


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"{DISTRIBUTION} {version(DISTRIBUTION)}"
    except PackageNotFoundError:
        return f"{DISTRIBUTION} (not installed)"


def source_digest(root: Path = ROOT, dirs: tuple[str, ...] = CODE_DIRS) -> str:
    """sha256 over each source file's path and bytes (sorted) and requirements.lock: computed,
    not cached, so it is the code on disk now."""
    h = hashlib.sha256()
    for d in dirs:
        for path in sorted((root / d).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    lock = root / "requirements.lock"
    if lock.exists():
        h.update(lock.read_bytes())
    return h.hexdigest()[:16]


def code_version() -> str:
    return f"{package_version()}+{source_digest()}"
