"""The `pippo` command line (SPEC §2).

Handlers are imported only when their command runs, so `pippo --help` stays instant and a
command never pays for torch or Ray unless it uses them. Every error a user can cause ends as one
line on stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

EPILOG = ("Configs are YAML files; override any key after the file name as key.sub=value "
          "(values parsed as YAML). Environment: PIPPO_STORE, MLFLOW_TRACKING_URI, RAY_ADDRESS, "
          "AWS_ENDPOINT_URL.")


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line promise: a usage error is one line on stderr (exit 2), not the
    usage block plus the error."""

    def error(self, message):
        from pippo_common.errors import EXIT_USER
        from pippo_common.redact import redact_text
        from pippo_common.text import one_line
        self.exit(EXIT_USER, f"{self.prog}: error: {one_line(redact_text(message))} (see {self.prog} --help)\n")


def _int_in(low: int, high: int):
    """argparse type: an integer within low..high (a negative count or zero cameras is one line)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not within {low}..{high}")
        return value
    parse.__name__ = "integer"
    return parse


def _float_in(low: float, high: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if not low <= value <= high:      # also refuses nan
            raise argparse.ArgumentTypeError(f"{text} is not within {low:g}..{high:g}")
        return value
    parse.__name__ = "number"
    return parse


SIDE = _int_in(16, 8192)          # image sides in pixels
SEED = _int_in(0, 2**31 - 1)


def _verbosity_flags(p, top: bool) -> None:
    """-v/-q on the top parser and on every subcommand (`pippo data build C -v` = `pippo -v data
    build C`). Subcommands default to SUPPRESS so they never overwrite a flag given before them."""
    default = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging (and libraries' INFO lines, tracebacks of errors)", **default)
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only", **default)


def _all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):   # aliases repeat a parser
                yield from _all_parsers(sub)


def _add(sub, name: str, target: str, help_text: str, description: str | None = None):
    p = sub.add_parser(name, help=help_text, description=description or help_text, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(_target=target)
    return p


def _json_flag(p):
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout and nothing else")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pippo",
        description="Pippo pipeline: data build (Ray -> WebDataset versions), DeepSpeed training "
                    "stages, workflow runs, Ray job submission and MLflow comparison.",
        epilog=EPILOG)
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ---- data ---------------------------------------------------------------------------------
    data = top.add_parser("data", help="synthetic data, inspection, dataset builds and versions",
                          description="Data commands: synthesise, inspect, build and manage dataset versions.")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = _add(dsub, "synth-captures", "pipelines.data_commands:synth_captures",
             "write synthetic studio captures (SPEC §3 layout)",
             "Render a procedural textured figure from a dome of cameras by exact ray casting and "
             "write each capture in the Ava-256 layout (transposed K/T, millimetres, per-camera zips).")
    p.add_argument("out", help="output directory (one sub-directory per capture)")
    p.add_argument("--captures", type=_int_in(1, 10_000), default=1, help="number of captures (default 1)")
    p.add_argument("--cameras", type=_int_in(1, 10_000), default=8, help="cameras per capture (default 8)")
    p.add_argument("--frames", type=_int_in(1, 1_000_000), default=2, help="frames per capture (default 2)")
    p.add_argument("--height", type=SIDE, default=256, help="frame height in pixels (default 256)")
    p.add_argument("--width", type=SIDE, default=168, help="frame width in pixels (default 168, Ava's portrait aspect)")
    p.add_argument("--seed", type=SEED, default=0, help="random seed (default 0)")
    p.add_argument("--format", choices=["png", "jpg", "avif"], default="png", help="frame encoding (default png)")
    p.add_argument("--no-masks", action="store_true", help="do not write segmentation masks")
    p.add_argument("--distortion", action="store_true", help="give cameras non-zero lens distortion")

    p = _add(dsub, "synth-images", "pipelines.data_commands:synth_images",
             "write unstructured person-like photos (JPEG/PNG, varied sizes)")
    p.add_argument("out", help="output directory")
    p.add_argument("--count", type=_int_in(1, 10_000_000), default=16, help="number of images (default 16)")
    p.add_argument("--seed", type=SEED, default=0, help="random seed (default 0)")

    p = _add(dsub, "synth-views", "pipelines.data_commands:synth_views",
             "write a rendered turnaround + cameras.json in the `pippo eval reprojection` layout",
             "Ground-truth turnaround views of the synthetic figure with exact cameras: the "
             "reprojection error's noise floor, and test input for the metric.")
    p.add_argument("out", help="output directory")
    p.add_argument("--views", type=_int_in(1, 100_000), default=24, help="number of views on the ring (default 24)")
    p.add_argument("--height", type=SIDE, default=256, help="view height (default 256)")
    p.add_argument("--width", type=SIDE, default=256, help="view width (default 256)")
    p.add_argument("--frame", type=_int_in(0, 2**31 - 1), default=0, help="head-pose frame (default 0)")

    p = _add(dsub, "inspect", "pipelines.data_commands:inspect",
             "cameras and frames of one capture (metres, SPEC §4)",
             "Read a capture (local path or fsspec URL), validate its calibration and list cameras "
             "and frames. With --preview PNG, also write a contact sheet of one frame with anchors.")
    p.add_argument("capture", help="capture directory or URL")
    _json_flag(p)
    p.add_argument("--preview", metavar="PNG", help="write a contact sheet of a frame to this file")
    p.add_argument("--frame", type=_int_in(0, 2**31 - 1), default=None, help="frame for --preview (default: first)")

    p = _add(dsub, "build", "pipelines.data_commands:build",
             "Ray Data build job: sources -> WebDataset shards -> a new dataset version")
    p.add_argument("config", help="build config YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--dry-run", action="store_true",
                   help="list the sources and plan the partitions (new, retried, gone inputs); build nothing")
    _json_flag(p)

    p = _add(dsub, "versions", "pipelines.data_commands:versions", "versions of a dataset, newest first")
    p.add_argument("uri", help="dataset URI")
    _json_flag(p)

    p = _add(dsub, "show", "pipelines.data_commands:show", "one dataset version (SPEC §6)")
    p.add_argument("ref", help="URI@REF (REF = id, unique id prefix, tag, or latest)")
    _json_flag(p)

    p = _add(dsub, "diff", "pipelines.data_commands:diff", "shards and sample counts added/removed")
    p.add_argument("a", help="URI@A")
    p.add_argument("b", help="URI@B")
    _json_flag(p)

    p = _add(dsub, "tag", "pipelines.data_commands:tag", "set a mutable tag on a version")
    p.add_argument("ref", help="URI@REF")
    p.add_argument("name", help="tag name")

    p = _add(dsub, "untag", "pipelines.data_commands:untag", "remove a tag (the version stays)")
    p.add_argument("uri", help="dataset URI")
    p.add_argument("name", help="tag name")

    p = _add(dsub, "gc", "pipelines.data_commands:gc", "garbage-collect files no listed version references",
             "Delete the store's own files (shards, parts, files of un-listed versions, expired leases "
             "and URL cache entries, temporary files) that no listed version references. Never touches "
             "foreign files, running builds or files younger than the grace period.\n\nexamples:\n"
             "  pippo data gc s3://bucket/datasets/humans --dry-run\n"
             "  pippo data gc ./ds --keep-last 3")
    p.add_argument("uri", help="dataset URI")
    p.add_argument("--keep-last", type=_int_in(0, 2**31 - 1), default=None, help="also drop all but the newest N untagged versions")
    p.add_argument("--grace-seconds", type=_float_in(0.0, 1e9), default=3600.0,
                   help="keep unreferenced files younger than this: they may belong to a running build (default 3600)")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")

    p = _add(dsub, "compact", "pipelines.data_commands:compact",
             "a new version with the same samples in fewer parts and full shards",
             "Merge each partition's parts into one and its small shards into full ones (the build "
             "config's shard limits); prints the new version id last.\n\nexample:\n"
             "  pippo data compact s3://bucket/datasets/humans@latest")
    p.add_argument("ref", help="URI@REF")
    p.add_argument("--min-fill", type=float, default=0.5, help="merge shards below this fraction of the limits")

    p = _add(dsub, "remove", "pipelines.data_commands:remove",
             "a new version without the listed inputs (takedown requests)",
             "Make a version of URI@REF without the inputs listed in FILE (one input id per line, as "
             "in the ledger); shards holding them are rewritten without them. Run gc after moving "
             "tags off older versions to delete the bytes.\n\nexample:\n"
             "  pippo data remove s3://bucket/datasets/humans@latest --inputs takedown.txt")
    p.add_argument("ref", help="URI@REF")
    p.add_argument("--inputs", required=True, metavar="FILE", help="input ids, one per line")

    p = _add(dsub, "rejects", "pipelines.data_commands:rejects",
             "the rejected and removed inputs of a version (JSON lines)")
    p.add_argument("ref", help="URI@REF")

    # ---- training, workflow, cluster ----------------------------------------------------------
    p = _add(top, "train", "pipelines.train_commands:train", "one training stage (pretrain, mid or post)",
             "Train one stage with DeepSpeed ZeRO under Ray Train (TorchTrainer, `workers` workers), "
             "checkpoints on any fsspec URL, tracked in MLflow. Re-running the same command resumes "
             "the run from its newest complete checkpoint.\n\nexamples:\n"
             "  pippo train configs/stages/pretrain.yaml\n"
             "  pippo train configs/stages/mid.yaml workers=4 deepspeed=configs/deepspeed/zero3.json\n"
             "  pippo train configs/stages/post.yaml init_from=s3://bucket/ckpt/mid-1a2b3c4d5e "
             "checkpoint.root=s3://bucket/ckpt\n"
             "  pippo train configs/stages/pretrain.yaml --local   # no Ray: this process (or torchrun)")
    p.add_argument("config", help="stage config YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--local", action="store_true",
                   help="run the per-worker loop in this process instead of Ray Train (1 rank, or torchrun's)")
    _json_flag(p)

    pipe = top.add_parser("pipeline", help="the workflow DAG", description="Workflow commands.")
    psub = pipe.add_subparsers(dest="pipeline_command", metavar="SUBCOMMAND", required=True)
    p = _add(psub, "run", "pipelines.workflow_commands:run", "run the workflow DAG (cached, resumable)",
             "Run a DAG of steps (synth, dataprep, train, eval) declared in YAML. Each step is cached by a "
             "hash of code, config and input artifact ids (dataset versions, checkpoints): a re-run skips "
             "finished steps, a changed config re-runs only that step and what is downstream of it. One "
             "MLflow parent run per invocation, a child run per step; prints the parent run id last."
             "\n\nexamples:\n"
             "  pippo pipeline run configs/pipelines/demo.yaml\n"
             "  pippo pipeline run configs/pipelines/demo.yaml steps.post.overrides.steps=200\n"
             "  pippo pipeline run configs/pipelines/demo.yaml steps.eval.enabled=false\n"
             "  pippo pipeline run configs/pipelines/demo.yaml --resume 3f2a...   # continue a failed run")
    p.add_argument("config", help="pipeline config YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--resume", metavar="RUN", help="resume this pipeline run id")

    p = _add(top, "submit", "cluster.submit:main", "run `pippo ARGS...` as a Ray job on a cluster",
             "Run `pippo ARGS...` on a Ray cluster through the Jobs API. The job ships this source "
             "tree (working_dir) and, by default, the package's dependencies pinned to "
             "requirements.lock (a stock Ray image needs nothing installed; ray itself comes from "
             "the cluster; torch's build follows --torch). Only git-tracked files and files ARGS "
             "name are shipped, never credential-shaped files or symlinks out of the tree. "
             "PIPPO_STORE, PIPPO_VERBOSITY, MLFLOW_TRACKING_URI, MLFLOW_S3_ENDPOINT_URL, "
             "AWS_ENDPOINT_URL(_S3) and AWS_REGION / AWS_DEFAULT_REGION are forwarded when set, and "
             "nothing else; credentials never are (the cluster's own environment or Secrets supply "
             "them) and ARGS holding one are refused. The submission id is derived from the arguments, "
             "the code and the environment: submitting the same thing again returns the existing "
             "job. Prints the submission id alone on the last stdout line; --wait streams the job's "
             "logs to stderr and exits 0 if it SUCCEEDED, 1 if it FAILED or was STOPPED. Token-auth "
             "clusters: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.\n\nexamples:\n"
             "  export RAY_ADDRESS=http://127.0.0.1:8265   # e.g. `ray dashboard cluster/aws.yaml`\n"
             "  pippo submit --wait -- pipeline run configs/pipelines/demo.yaml\n"
             "  pippo submit --entrypoint-num-cpus 1 -- train configs/stages/mid.yaml workers=8\n"
             "  pippo submit --no-install --address http://head:8265 -- data build configs/datasets/demo.yaml\n"
             "  pippo submit --dry-run -- train configs/stages/mid.yaml   # what would be shipped\n"
             "  pippo submit --torch cuda -- train configs/stages/mid.yaml   # GPU workers on demand\n"
             "  pippo jobs logs pippo-pipeline-run-0123456789abcdef --follow")
    p.add_argument("--address", help="Ray dashboard URL, http://HEAD:8265 (default RAY_ADDRESS)")
    p.add_argument("--wait", action="store_true",
                   help="stream the job's logs (stderr) until it ends; exit 0 only if it SUCCEEDED")
    p.add_argument("--submission-id", metavar="ID",
                   help="use this id instead of the one derived from args + code + environment")
    p.add_argument("--retry", action="store_true",
                   help="if a job with this id FAILED or was STOPPED, replace it with a new run")
    p.add_argument("--no-install", action="store_true",
                   help="do not pip-install the pinned dependencies: the cluster's image already "
                        "has them (also PIPPO_SUBMIT_INSTALL=0)")
    p.add_argument("--torch", choices=["auto", "cpu", "cuda"], default="auto",
                   help="torch build to pip-install: auto (default) = the CUDA build if the cluster "
                        "has GPUs now or --entrypoint-num-gpus > 0, else the CPU build (no multi-GB "
                        "CUDA wheels on a CPU cluster); use cuda when GPU workers start on demand")
    p.add_argument("--torch-index-url", metavar="URL",
                   help="extra pip index for torch, overriding --torch, e.g. "
                        "https://download.pytorch.org/whl/cu128")
    p.add_argument("--dry-run", action="store_true",
                   help="print the files the job would ship and their total size; submit nothing")
    p.add_argument("--entrypoint-num-cpus", type=float, metavar="N",
                   help="CPUs reserved for the job's driver (Ray default 0)")
    p.add_argument("--entrypoint-num-gpus", type=float, metavar="N",
                   help="GPUs reserved for the job's driver (Ray default 0)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE",
                   help="one more non-secret environment variable for the job (repeatable)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the pippo arguments")

    jobs = top.add_parser("jobs", help="list, follow and stop Ray jobs on a cluster",
                          description="The Ray jobs of a cluster (--address or RAY_ADDRESS; "
                                      "token as for `pippo submit`).")
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="SUBCOMMAND", required=True)
    p = _add(jsub, "list", "cluster.jobs:list_jobs", "submitted jobs with status, start and command")
    p.add_argument("--address", help="Ray dashboard URL (default RAY_ADDRESS)")
    _json_flag(p)
    p = _add(jsub, "logs", "cluster.jobs:logs", "a job's logs on stdout")
    p.add_argument("id", help="submission id")
    p.add_argument("--follow", action="store_true",
                   help="stream until the job ends; exit 0 only if it SUCCEEDED")
    p.add_argument("--address", help="Ray dashboard URL (default RAY_ADDRESS)")
    p = _add(jsub, "stop", "cluster.jobs:stop", "stop a job and print its final status")
    p.add_argument("id", help="submission id")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the job to end (default 60)")
    p.add_argument("--address", help="Ray dashboard URL (default RAY_ADDRESS)")

    p = _add(top, "compare", "pipelines.compare:main", "MLflow comparison table and plots",
             "Compare the runs of one MLflow experiment (MLFLOW_TRACKING_URI): one row per run tagged "
             "pippo.step, parent pipeline runs with their step runs below them, the dataset version each "
             "trained on, the params that DIFFER between the runs, the final train/loss and eval metrics, "
             "the checkpoint. Plots (PNG) into --out: train/loss curves per stage and eval metrics per run."
             "\n\nexamples:\n"
             "  pippo compare                                  # the demo's experiment (or the newest one)\n"
             "  pippo compare --experiment pippo-demo --out out/compare\n"
             "  pippo compare --experiment test-post --json | jq '.runs[].metrics'")
    p.add_argument("--experiment", help="experiment name (default: configs/pipelines/demo.yaml's "
                                        "experiment, else the most recently active one)")
    p.add_argument("--out", default=None,
                   help="directory for the PNG plots (default out/compare; with --json, no plots unless --out)")
    _json_flag(p)

    p = _add(top, "sample", "pipelines.sample:main", "one photo -> turnaround GIF/MP4",
             "Generate a turnaround of the person in one photo (any size; cropped around the person "
             "found, else the centre square) with a trained stage: N views on an orbit at a fixed "
             "elevation and radius looking at the head, sampled jointly with DDIM and classifier-free "
             "guidance (attention biasing when N exceeds the trained views). Writes --out as a GIF, an "
             "MP4 beside it, and <out stem>_views/ (view00.png ..., cameras.json: the `pippo eval "
             "reprojection` layout). Prints the GIF path last.\n\nexamples:\n"
             "  pippo sample --checkpoint .pippo/store/checkpoints/post-1a2b3c4d5e --image me.jpg --out me.gif\n"
             "  pippo sample --checkpoint s3://bucket/ckpt/post-1a2b3c4d5e/final --image photo.png "
             "--views 48 --elevation 15 --out out/turn.gif\n"
             "  pippo eval reprojection out/turn_views      # score the generated views")
    p.add_argument("--checkpoint", required=True, help="a training run dir, its final/, or a .safetensors URI")
    p.add_argument("--image", required=True, help="input photo (local path or fsspec URL)")
    p.add_argument("--views", type=int, default=24, help="number of views (default 24)")
    p.add_argument("--out", required=True, help="output .gif (an .mp4 and a _views/ folder go beside it)")
    p.add_argument("--elevation", type=float, default=10.0, metavar="DEG",
                   help="camera elevation above the head, degrees (default 10)")
    p.add_argument("--radius", type=float, default=2.2, metavar="M",
                   help="orbit radius, metres (default 2.2, the capture dome's)")
    p.add_argument("--steps", type=int, default=30, help="DDIM steps (default 30)")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale (default 2.0; 1 = off)")
    p.add_argument("--gamma", type=float, default=1.0,
                   help="attention-biasing growth factor, used when N exceeds the trained views (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--resolution", type=int, default=None,
                   help="view side in pixels (default: the stage's training resolution)")

    ev = top.add_parser("eval", help="evaluation", description="Evaluation commands.")
    esub = ev.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    p = _add(esub, "reprojection", "pipelines.model_commands:eval_reprojection",
             "reprojection error of a set of views with known cameras",
             "DIR holds cameras.json ({'views': [{K, R, t, height, width}]}) and view00.png, "
             "view01.png, ... Prints RE as % of max(H, W).")
    p.add_argument("dir", help="directory of views")
    _json_flag(p)

    md = top.add_parser("model", help="model inspection", description="Model commands.")
    msub = md.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    p = _add(msub, "info", "pipelines.model_commands:model_info",
             "parameters per module and training FLOPs per sample")
    p.add_argument("config", help="model config YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    _json_flag(p)
    for n, sub in enumerate(_all_parsers(parser)):
        _verbosity_flags(sub, top=n == 0)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pippo_common.redact import redacting, register_url_credentials

    global _OWN_PROCESS
    _OWN_PROCESS = argv is None           # the console script, not an in-process caller
    argv = list(sys.argv[1:] if argv is None else argv)
    for arg in argv:                 # e.g. s3://KEY:SECRET@bucket: never echoed, in any form
        register_url_credentials(arg)
    # Every line printed (result lines, Ray's forwarded worker lines, libraries' prints) goes
    # through the one redactor; the streams are given back afterwards (in-process callers).
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = redacting(out), redacting(err)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = out, err


def _main(argv: list[str]) -> int:
    from pippo_common.logs import configure
    from pippo_common.errors import report
    from pippo_common.text import one_line

    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    configure(1 if verbose else -1 if getattr(args, "quiet", False) else 0)
    module_name, func_name = args._target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"pippo: '{args.command}' is not built yet", file=sys.stderr)
            return 3
        raise
    func = getattr(module, func_name, None)
    if func is None:
        print(f"pippo: '{args.command}' is not built yet", file=sys.stderr)
        return 3
    try:
        code = func(args)
        sys.stdout.flush()       # a closed pipe must fail here, not at interpreter exit
    except BrokenPipeError:
        if _stdout_broken():     # `pippo data versions D | head -1`: the reader left; so do we
            _silence_stdout()
            return 141           # 128 + SIGPIPE, what a shell reports for `seq 9999 | head -1`
        return report(sys.exc_info()[1], verbose)
    except KeyboardInterrupt as exc:      # a command may say where it stopped and how to continue
        _end_ray()
        where = one_line(str(exc)) if str(exc) else ""
        print(f"pippo: interrupted{': ' + where if where else ''}", file=sys.stderr)
        return 130
    except Exception as exc:
        _end_ray()
        return report(exc, verbose)      # the one convention (pippo_common.errors), cluster commands too
    return int(code or 0)


_OWN_PROCESS = False


def _end_ray() -> None:
    """Before the last line of a failed command: stop this process's Ray driver. Ray forwards
    workers' lines late (deduplicated, "[repeated 4x across cluster]") and flushes them on
    shutdown, so they come before `pippo: error: ...`, which stays the last line. Only in the
    console script's own process: an in-process caller keeps its Ray."""
    ray = sys.modules.get("ray")
    if not _OWN_PROCESS or ray is None:
        return
    try:
        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - the error line matters more than a clean shutdown
        pass


def _stdout_broken() -> bool:
    """True if stdout is a pipe or socket whose reader has gone (not some other broken pipe,
    e.g. to an object store, which is an error to report)."""
    try:
        import select
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):   # no real fd (an in-process test's stdout)
        return True


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass


if __name__ == "__main__":
    # `python -m pipelines.cli` runs this file as __main__: call the imported module's main so
    # module state (_OWN_PROCESS, read by _end_ray) is the one the commands' modules see
    from pipelines.cli import main as _main

    sys.exit(_main())
