"""`pippo compare [--experiment NAME] [--out DIR] [--json]`: the runs of one MLflow experiment.

Rows are the runs tagged `pippo.step` (SPEC §7): a pipeline's parent run (step "pipeline") with
its step runs (tag `mlflow.parentRunId`) listed under it, and stand-alone `pippo train` runs. Per
run: status, the dataset version it read (the digest of its logged dataset inputs), the params that
differ between the compared runs, the final value of each headline metric and the checkpoint tag.
Plots (PNG, matplotlib's Agg canvas, no display needed): train/loss against step with one panel
per stage and one line per run, and the eval metrics of every run that has them.

Reads only; works against the sqlite store or an `mlflow server` alike (MLFLOW_TRACKING_URI).
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from pippo_common.text import printable
from pippo_common.redact import redact
from pippo_common.errors import UserError

log = logging.getLogger("pippo.compare")

STEP_TAG = "pippo.step"
PARENT_TAG = "mlflow.parentRunId"
LOSS = "train/loss"
EVAL_METRICS = ("eval/re_pct", "eval/psnr", "eval/ssim")
# the stage table (`stage_evals`): every eval metric a stage comparison needs, side by side
STAGE_EVAL_METRICS = ("eval/psnr", "eval/psnr_seen", "eval/psnr_wrong_camera", "eval/ssim", "eval/re_pct",
                      "eval/re_pct_gt", "eval/re_pct_same_pairs", "eval/re_pct_gt_same_pairs", "eval/re_pairs",
                      "eval/re_pairs_gt")
METRICS = (LOSS, *EVAL_METRICS)
STAGES = ("pretrain", "mid", "post")              # panel order of the loss plot
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pipelines" / "demo.yaml"


# -- choosing the experiment -------------------------------------------------------------------------

def _demo_experiment() -> str:
    """The experiment of the README's main job, read from its config (the name may change there)."""
    try:
        import yaml

        return str(yaml.safe_load(DEMO_CONFIG.read_text()).get("experiment") or "pippo-demo")
    except (OSError, ValueError, AttributeError):
        return "pippo-demo"


def _newest_run_start(client, exp) -> int | None:
    """Start time of the experiment's newest run (an experiment's own timestamps do not move when
    runs are added), None when it has none."""
    runs = client.search_runs([exp.experiment_id], max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.start_time or 0 if runs else None


def choose_experiment(client, name: str | None, uri: str):
    """The named experiment (unknown: UserError), else the demo's, else the experiment whose newest
    run started last."""
    if name:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = sorted(printable(e.name) for e in client.search_experiments(max_results=1000))
            listed = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
            raise UserError(f"no experiment named {name!r} in {redact(uri)} (known: {listed or 'none'})")
        return exp
    exp = client.get_experiment_by_name(_demo_experiment())
    if exp is not None:
        return exp
    active = [(start, e) for e in client.search_experiments(max_results=1000)
              if (start := _newest_run_start(client, e)) is not None]
    if not active:
        raise UserError(f"no MLflow experiment with runs in {redact(uri)}")
    return max(active, key=lambda pair: pair[0])[1]


# -- collecting runs -----------------------------------------------------------------------------------

def _all_runs(client, experiment_id: str) -> list:
    """Every run of the experiment tagged pippo.step (search_runs pages; a server caps a page)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{STEP_TAG}` != ''",
                                  max_results=1000, order_by=["attributes.start_time ASC"], page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _dataset_versions(run) -> list[str]:
    """Digests of the run's dataset inputs (= dataset version ids, SPEC §7); the dataprep step
    records its output version as a tag instead."""
    inputs = getattr(run, "inputs", None)
    digests = [d.dataset.digest for d in (inputs.dataset_inputs if inputs else [])]
    if not digests and run.data.tags.get("pippo.dataset_version"):
        digests = [run.data.tags["pippo.dataset_version"]]
    return sorted(set(digests))


def _iso(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds") if ms else None


def run_row(run) -> dict:
    tags, info = run.data.tags, run.info
    return {"run_id": info.run_id, "name": info.run_name or tags.get("mlflow.runName", ""),
            "step": tags.get(STEP_TAG), "status": info.status, "parent_run_id": tags.get(PARENT_TAG),
            "cached": tags.get("pippo.cached") == "true", "start_time": _iso(info.start_time),
            "dataset_versions": _dataset_versions(run),
            "metrics": {k: run.data.metrics[k] for k in METRICS if k in run.data.metrics},
            "eval_stage": tags.get("pippo.eval_stage"),
            "eval_metrics": {k: v for k, v in run.data.metrics.items() if k in STAGE_EVAL_METRICS},
            "checkpoint": tags.get("pippo.checkpoint")}


def differing_params(runs) -> list[str]:
    """Param keys whose value is not the same in every run that logged params (a key one of them
    lacks differs). Runs without params (pipeline parents, cached steps) are not compared: they
    would make every key differ."""
    # compared within one kind of step (a pretrain run against other pretrain runs...): across
    # kinds every key would "differ"; run-local bookkeeping (the parent run id) is no difference
    groups: dict = {}
    for r in runs:
        if r.data.params:
            groups.setdefault((r.data.tags.get(STEP_TAG), r.data.tags.get("pippo.workflow_step")), []).append(r.data.params)
    out = set()
    for with_params in groups.values():
        if len(with_params) < 2:
            continue
        keys = set().union(*with_params) - {"tracking.parent_run_id"}
        out |= {k for k in keys if len({p.get(k) for p in with_params}) > 1}
    return sorted(out)


def tree_order(rows: list[dict]) -> list[dict]:
    """Parents first (by start time), each followed by its children; `depth` says which is which.
    A child whose parent is not among the rows (say, a parent without pippo.step) is a root."""
    ids = {r["run_id"] for r in rows}
    children: dict[str, list[dict]] = {}
    for r in rows:
        if r["parent_run_id"] in ids:
            children.setdefault(r["parent_run_id"], []).append(r)
    out: list[dict] = []

    def visit(row: dict, depth: int) -> None:
        out.append({**row, "depth": depth, "children": [c["run_id"] for c in children.get(row["run_id"], [])]})
        for child in children.get(row["run_id"], []):
            visit(child, depth + 1)

    for r in rows:
        if r["parent_run_id"] not in ids:
            visit(r, 0)
    return out


def loss_histories(client, rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """run id -> [(step, train/loss)] of the runs that logged it."""
    out = {}
    for r in rows:
        if LOSS in r["metrics"]:
            hist = client.get_metric_history(r["run_id"], LOSS)
            out[r["run_id"]] = sorted((m.step, m.value) for m in hist)
    return out


# -- plots ------------------------------------------------------------------------------------------

def _label(row: dict) -> str:
    return f"{row['name'] or row['step']} ({row['run_id'][:8]})"


def plot_losses(rows: list[dict], histories: dict, path: Path) -> Path | None:
    """One panel per stage, one line per run: runs of a stage are comparable, stages are not."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    by_stage: dict[str, list[dict]] = {}
    for r in rows:
        if r["run_id"] in histories:
            by_stage.setdefault(r["step"], []).append(r)
    if not by_stage:
        return None
    stages = sorted(by_stage, key=lambda s: (STAGES.index(s) if s in STAGES else len(STAGES), s))
    fig = Figure(figsize=(5 * len(stages), 3.8), layout="constrained")
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    for ax, stage in zip(axes, stages):
        for r in by_stage[stage]:
            steps, values = zip(*histories[r["run_id"]])
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=_label(r))
        ax.set(title=stage, xlabel="step", ylabel=LOSS)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))      # steps are whole numbers
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)          # a bare Figure renders through Agg: no display, no pyplot state
    return path


def plot_evals(rows: list[dict], path: Path) -> Path | None:
    """One bar chart per eval metric (their scales differ), one bar per run that has it."""
    from matplotlib.figure import Figure

    names = [m for m in EVAL_METRICS if any(m in r["metrics"] for r in rows)]
    if not names:
        return None
    fig = Figure(figsize=(4.5 * len(names), 3.8), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, metric in zip(axes, names):
        have = [r for r in rows if metric in r["metrics"]]
        ax.bar(range(len(have)), [r["metrics"][metric] for r in have], color="tab:blue")
        ax.set_xticks(range(len(have)), [_label(r) for r in have], rotation=30, ha="right", fontsize="small")
        ax.set(title=metric)
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


# -- text output ------------------------------------------------------------------------------------

def _fmt(v, width: int = 48) -> str:
    """A table cell; long values (URIs) keep their end, where they differ (run names, hashes).
    Names, tags and params come from whoever wrote the runs: no terminal escapes get through."""
    if v is None:
        return "-"
    s = f"{v:.4g}" if isinstance(v, float) else printable(v)
    return s if len(s) <= width else "…" + s[-(width - 1):]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def stage_evals(rows: list[dict]) -> dict[str, dict]:
    """stage -> the eval metrics of its newest eval run (rows carry `eval_stage`), stages in
    training order: what changed from pretrain to mid to post, in one table."""
    newest: dict[str, dict] = {}
    for r in rows:
        if r.get("eval_stage") and r["eval_metrics"]:
            if r["eval_stage"] not in newest or (r["start_time"] or "") > (newest[r["eval_stage"]]["start_time"] or ""):
                newest[r["eval_stage"]] = r
    order = sorted(newest, key=lambda s: (STAGES.index(s) if s in STAGES else len(STAGES), s))
    return {s: {"run_id": newest[s]["run_id"], **newest[s]["eval_metrics"]} for s in order}


def render_text(doc: dict) -> str:
    metrics = [m for m in METRICS if any(m in r["metrics"] for r in doc["runs"])]
    header = ["run", "name", "step", "status", "dataset", *metrics, "checkpoint"]
    rows = []
    for r in doc["runs"]:
        name = "  " * r["depth"] + ("└ " if r["depth"] else "") + printable(r["name"] or "")
        status = printable(r["status"]) + (" (cached)" if r["cached"] else "")
        dataset = ",".join(printable(v)[:12] for v in r["dataset_versions"]) or "-"
        rows.append([printable(r["run_id"][:8]), name, printable(r["step"] or "-"), status, dataset,
                     *(_fmt(r["metrics"].get(m)) for m in metrics), _fmt(r["checkpoint"], 72)])
    exp = doc["experiment"]
    out = [f"experiment {printable(exp['name'])} (id {printable(exp['id'])}, {printable(doc['tracking_uri'])}): "
           f"{len(rows)} runs", ""]
    out += _table(header, rows) if rows else ["(no runs tagged pippo.step)"]
    if doc["differing_params"]:
        compared = [r for r in doc["runs"] if r["params"]]
        out += ["", "params that differ:"]
        out += _table(["param", *(printable(r["run_id"][:8]) for r in compared)],
                      [[_fmt(k), *(_fmt(r["params"].get(k)) for r in compared)] for k in doc["differing_params"]])
    evals = doc.get("stage_evals") or {}
    if evals:
        names = [m for m in STAGE_EVAL_METRICS if any(m in e for e in evals.values())]
        out += ["", "eval metrics by stage (newest eval run of each):"]
        out += _table(["metric", *(printable(s) for s in evals)], [[m, *(_fmt(e.get(m)) for e in evals.values())] for m in names])
    plots = [p for p in doc["plots"].values() if p]
    out += ["", "plots: " + (", ".join(plots) if plots else "none (no train/loss or eval metrics logged)")]
    return "\n".join(out)


# -- the comparison ------------------------------------------------------------------------------------

def compare(experiment: str | None, out_dir: str | Path | None) -> dict:
    """The comparison as one JSON-able document (also what --json prints); plots into `out_dir`
    unless it is None."""
    from mlflow import MlflowClient

    from pipelines.tracking import _quiet_mlflow, tracking_uri

    _quiet_mlflow()
    uri = tracking_uri()
    client = MlflowClient(uri)
    exp = choose_experiment(client, experiment, uri)
    runs = _all_runs(client, exp.experiment_id)
    keys = differing_params(runs)
    params = {r.info.run_id: {k: r.data.params.get(k) for k in keys} if r.data.params else {} for r in runs}
    rows = tree_order([{**run_row(r), "params": params[r.info.run_id]} for r in runs])
    loss = evals = None
    if out_dir is not None:               # None: the document only (`--json` without --out)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("loss_curves.png", "eval_metrics.png"):   # an earlier comparison's plot would mislead
            (out / stale).unlink(missing_ok=True)
        loss = plot_losses(rows, loss_histories(client, rows), out / "loss_curves.png")
        evals = plot_evals(rows, out / "eval_metrics.png")
    # a server URI may carry user:password@
    return {"experiment": {"name": exp.name, "id": exp.experiment_id}, "tracking_uri": redact(uri), "runs": rows,
            "differing_params": keys, "stage_evals": stage_evals(rows),
            "plots": {"loss": str(loss.resolve()) if loss else None, "eval": str(evals.resolve()) if evals else None}}
