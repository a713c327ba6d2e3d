"""Ending a failed command cleanly: shared by the CLI's dispatcher and the handlers that report a
failure themselves (`pippo pipeline run`), so it lives apart from both."""
from __future__ import annotations

import sys

# True in the console script's own process (main() without argv), not for an in-process caller.
own_process = False


def end_ray() -> None:
    """Before the last line of a failed command: stop this process's Ray driver. Ray forwards
    workers' lines late (deduplicated, "[repeated 4x across cluster]") and flushes them on
    shutdown, so they come before `pippo: error: ...`, which stays the last line. Only in the
    console script's own process: an in-process caller keeps its Ray."""
    ray = sys.modules.get("ray")
    if not own_process or ray is None:
        return
    try:
        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - the error line matters more than a clean shutdown
        pass
