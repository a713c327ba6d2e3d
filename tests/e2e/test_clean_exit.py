"""Every read-only command exits cleanly (issue 16, item 9): `pippo data show --json` aborted at
exit about one run in 12 (`terminate called without an active exception`, SIGABRT, exit 134):
Arrow's thread pools, started by reading the version's parquet files, were alive at interpreter
shutdown and raced their static destructors.

Each read-only command runs 50 times (10 for the two heavy ones, below) through
tests/e2e/exit_cleanly.py: once in the helper's process, which also counts the threads the command
leaves running (deterministic: the old reads left three), then 49 times in children forked from
it, each through the real `pippo` main and the full interpreter shutdown, none killed by a
signal. Forking from a process that already imported the command's libraries makes a run cost
the command, not ~1 s of imports."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from support import VID, crafted_dataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, synth_capture_dir):
    import mlflow

    from dataprep.studio.synth import write_views

    tmp = tmp_path_factory.mktemp("clean_exit")
    ds = crafted_dataset(tmp, {})
    ledger = pa.table({"input": ["a.jpg"], "status": ["rejected"], "stage": ["decode"], "reason": ["bad"],
                       "attempts": [1]})            # the columns `data rejects` prints
    pq.write_table(ledger, Path(ds, "parts", "r", "p0.ledger.parquet"))
    views = write_views(tmp / "views", 3, 48, 48)
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("exit-test", artifact_location=str(tmp / "art")),
                            tags={"pippo.step": "pretrain"})
    client.log_metric(run.info.run_id, "train/loss", 1.0, step=0)
    return {"ds": ds, "capture": str(synth_capture_dir), "views": str(views), "mlflow": uri, "tmp": tmp}


# runs of each command: 50, except the two whose every run builds a model or opens an MLflow store
# (seconds each on 2 busy cores); they start no Arrow read, and the thread count covers them too.
COMMANDS = {
    "data versions": (50, lambda i: ["data", "versions", i["ds"], "--json"]),
    "data show": (50, lambda i: ["data", "show", f"{i['ds']}@{VID}", "--json"]),
    "data diff": (50, lambda i: ["data", "diff", f"{i['ds']}@{VID}", f"{i['ds']}@latest", "--json"]),
    "data rejects": (50, lambda i: ["data", "rejects", f"{i['ds']}@{VID}"]),
    "data inspect": (50, lambda i: ["data", "inspect", i["capture"], "--json"]),
    "eval reprojection": (50, lambda i: ["eval", "reprojection", i["views"], "--json"]),
    "model info": (10, lambda i: ["model", "info", str(ROOT / "configs/models/test.yaml"), "--json"]),
    "compare": (10, lambda i: ["compare", "--experiment", "exit-test", "--json"]),
}


# The commands that read the store's parquet files start no thread at all; the others import
# libraries that keep plain pthread pools (OpenCV, image codecs: no std::thread to abort on).
STORE_READERS = ("data versions", "data show", "data diff", "data rejects")


@pytest.mark.parametrize("name", COMMANDS)
def test_read_only_command_exits_cleanly_every_time(inputs, name):
    runs, argv = COMMANDS[name]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "e2e" / "exit_cleanly.py"), str(runs - 1),
                           str(inputs["tmp"]), "--", *argv(inputs)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MLFLOW_TRACKING_URI": inputs["mlflow"]})
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["first"] == 0 and r["signals"] == {} and r["exits"] == {"0": runs - 1}, r
    if name in STORE_READERS:
        assert r["threads_after"] == r["threads_before"], r
