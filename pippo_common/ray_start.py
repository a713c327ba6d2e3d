"""Starting Ray the one way: the driver of a data build, a training stage and a workflow step all
come through `ensure_ray`, so every worker gets the same log levels and redaction and every line
Ray forwards lands on stderr (stdout carries a command's result)."""
from __future__ import annotations

import logging
import os

from pippo_common.logs import quiet_ray, ray_output_to_stderr

WORKER_SETUP_HOOK = "pippo_common.logs.setup_worker"


def ensure_ray(dashboard: bool = False):
    """Local Ray in-process unless RAY_ADDRESS names a cluster (never attach to a stray one).
    `dashboard`: also start the dashboard, whose state API Ray Train's controller polls."""
    import ray

    if not ray.is_initialized():
        # workers get the driver's log levels and redaction (their lines are forwarded to stderr)
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=dashboard,
                 logging_level=logging.WARNING, configure_logging=False,
                 runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK})
        quiet_ray()
        ray_output_to_stderr()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray
