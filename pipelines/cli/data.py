"""`pippo data ...`: synthetic data, inspection, dataset builds and versions (parsers + handlers).
The work is dataprep's (synth, capture, build, store, maintenance); handlers call it and print."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from pipelines.cli.args import SEED, SIDE, add_command, add_group, float_in, int_in, json_flag

log = logging.getLogger("pippo.data")


def register(top) -> None:
    dsub = add_group(top, "data", "synthetic data, inspection, dataset builds and versions",
                     "Data commands: synthesise, inspect, build and manage dataset versions.", "data_command")
    p = add_command(dsub, "synth-captures", synth_captures,
                    "write synthetic studio captures (SPEC §3 layout)",
                    "Render a procedural textured figure from a dome of cameras by exact ray casting and "
                    "write each capture in the Ava-256 layout (transposed K/T, millimetres, per-camera zips).")
    p.add_argument("out", help="output directory (one sub-directory per capture)")
    p.add_argument("--captures", type=int_in(1, 10_000), default=1, help="number of captures (default 1)")
    p.add_argument("--cameras", type=int_in(1, 10_000), default=8, help="cameras per capture (default 8)")
    p.add_argument("--frames", type=int_in(1, 1_000_000), default=2, help="frames per capture (default 2)")
    p.add_argument("--height", type=SIDE, default=256, help="frame height in pixels (default 256)")
    p.add_argument("--width", type=SIDE, default=168, help="frame width in pixels (default 168, Ava's portrait aspect)")
    p.add_argument("--seed", type=SEED, default=0, help="random seed (default 0)")
    p.add_argument("--format", choices=["png", "jpg", "avif"], default="png", help="frame encoding (default png)")
    p.add_argument("--no-masks", action="store_true", help="do not write segmentation masks")
    p.add_argument("--distortion", action="store_true", help="give cameras non-zero lens distortion")

    p = add_command(dsub, "synth-images", synth_images,
                    "write unstructured person-like photos (JPEG/PNG, varied sizes)")
    p.add_argument("out", help="output directory")
    p.add_argument("--count", type=int_in(1, 10_000_000), default=16, help="number of images (default 16)")
    p.add_argument("--seed", type=SEED, default=0, help="random seed (default 0)")

    p = add_command(dsub, "synth-views", synth_views,
                    "write a rendered turnaround + cameras.json in the `pippo eval reprojection` layout",
                    "Ground-truth turnaround views of the synthetic figure with exact cameras: the "
                    "reprojection error's noise floor, and test input for the metric.")
    p.add_argument("out", help="output directory")
    p.add_argument("--views", type=int_in(1, 100_000), default=24, help="number of views on the ring (default 24)")
    p.add_argument("--height", type=SIDE, default=256, help="view height (default 256)")
    p.add_argument("--width", type=SIDE, default=256, help="view width (default 256)")
    p.add_argument("--frame", type=int_in(0, 2**31 - 1), default=0, help="head-pose frame (default 0)")

    p = add_command(dsub, "inspect", inspect,
                    "cameras and frames of one capture (metres, SPEC §4)",
                    "Read a capture (local path or fsspec URL), validate its calibration and list cameras "
                    "and frames. With --preview PNG, also write a contact sheet of one frame with anchors.")
    p.add_argument("capture", help="capture directory or URL")
    json_flag(p)
    p.add_argument("--preview", metavar="PNG", help="write a contact sheet of a frame to this file")
    p.add_argument("--frame", type=int_in(0, 2**31 - 1), default=None, help="frame for --preview (default: first)")

    p = add_command(dsub, "build", build,
                    "Ray Data build job: sources -> WebDataset shards -> a new dataset version")
    p.add_argument("config", help="build config YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--dry-run", action="store_true",
                   help="list the sources and plan the partitions (new, retried, gone inputs); build nothing")
    json_flag(p)

    p = add_command(dsub, "versions", versions, "versions of a dataset, newest first")
    p.add_argument("uri", help="dataset URI")
    json_flag(p)

    p = add_command(dsub, "show", show, "one dataset version (SPEC §6)")
    p.add_argument("ref", help="URI@REF (REF = id, unique id prefix, tag, or latest)")
    json_flag(p)

    p = add_command(dsub, "diff", diff, "shards and sample counts added/removed")
    p.add_argument("a", help="URI@A")
    p.add_argument("b", help="URI@B")
    json_flag(p)

    p = add_command(dsub, "tag", tag, "set a mutable tag on a version")
    p.add_argument("ref", help="URI@REF")
    p.add_argument("name", help="tag name")

    p = add_command(dsub, "untag", untag, "remove a tag (the version stays)")
    p.add_argument("uri", help="dataset URI")
    p.add_argument("name", help="tag name")

    p = add_command(dsub, "gc", gc, "garbage-collect files no listed version references",
                    "Delete the store's own files (shards, parts, files of un-listed versions, expired leases "
                    "and URL cache entries, temporary files) that no listed version references. Never touches "
                    "foreign files, running builds or files younger than the grace period.\n\nexamples:\n"
                    "  pippo data gc s3://bucket/datasets/humans --dry-run\n"
                    "  pippo data gc ./ds --keep-last 3")
    p.add_argument("uri", help="dataset URI")
    p.add_argument("--keep-last", type=int_in(0, 2**31 - 1), default=None, help="also drop all but the newest N untagged versions")
    p.add_argument("--grace-seconds", type=float_in(0.0, 1e9), default=3600.0,
                   help="keep unreferenced files younger than this: they may belong to a running build (default 3600)")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")

    p = add_command(dsub, "compact", compact,
                    "a new version with the same samples in fewer parts and full shards",
                    "Merge each partition's parts into one and its small shards into full ones (the build "
                    "config's shard limits); prints the new version id last.\n\nexample:\n"
                    "  pippo data compact s3://bucket/datasets/humans@latest")
    p.add_argument("ref", help="URI@REF")
    p.add_argument("--min-fill", type=float, default=0.5, help="merge shards below this fraction of the limits")

    p = add_command(dsub, "remove", remove,
                    "a new version without the listed inputs (takedown requests)",
                    "Make a version of URI@REF without the inputs listed in FILE (one input id per line, as "
                    "in the ledger); shards holding them are rewritten without them. Run gc after moving "
                    "tags off older versions to delete the bytes.\n\nexample:\n"
                    "  pippo data remove s3://bucket/datasets/humans@latest --inputs takedown.txt")
    p.add_argument("ref", help="URI@REF")
    p.add_argument("--inputs", required=True, metavar="FILE", help="input ids, one per line")

    p = add_command(dsub, "rejects", rejects,
                    "the rejected and removed inputs of a version (JSON lines)")
    p.add_argument("ref", help="URI@REF")


def synth_captures(args) -> int:
    from tqdm import tqdm

    from dataprep.studio.synth import synth_capture

    out = Path(args.out)
    total = args.captures * args.cameras * args.frames
    with tqdm(total=total, desc="rendering views", unit="view", file=sys.stderr, disable=None) as bar:
        for k in range(args.captures):
            path = synth_capture(out / f"capture_{args.seed:04d}_{k:03d}", cameras=args.cameras,
                                 frames=args.frames, height=args.height, width=args.width,
                                 seed=args.seed * 1000 + k, fmt=args.format, masks=not args.no_masks,
                                 distortion=args.distortion, progress=bar)
            log.info("wrote capture %s", path)
    print(out)
    return 0


def synth_images(args) -> int:
    from tqdm import tqdm

    from dataprep.studio.synth import synth_images as write_images

    with tqdm(total=args.count, desc="rendering photos", unit="img", file=sys.stderr, disable=None) as bar:
        paths = write_images(args.out, args.count, args.seed, progress=bar)
    log.info("wrote %d photos to %s", len(paths), args.out)
    print(args.out)
    return 0


def synth_views(args) -> int:
    from dataprep.studio.synth import write_views

    print(write_views(args.out, args.views, args.height, args.width, args.frame))
    return 0


def inspect(args) -> int:
    from dataprep.studio.capture import Capture
    from dataprep.samples.preview import frame_contact_sheet, png_bytes
    from pippo_common.redact import strip_credentials
    from pippo_common.storage import atomic_write_bytes, check_store

    check_store(args.capture)       # a dead endpoint: one line now, not after s3fs's retries
    with Capture(args.capture, strict=False) as cap:
        info = cap.describe()
        info["uri"] = strip_credentials(info["uri"])
        if args.preview:
            frame = args.frame if args.frame is not None else cap.frames[0]
            atomic_write_bytes(args.preview, png_bytes(frame_contact_sheet(cap, frame)))
            log.info("wrote contact sheet of frame %d to %s", frame, args.preview)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"capture {info['capture']} ({info['uri']}): {len(info['cameras'])} cameras, "
          f"{len(info['frames'])} frames, masks: {'yes' if info['has_masks'] else 'no'}")
    print(f"frames: {info['frames'][:10]}{' ...' if len(info['frames']) > 10 else ''}")
    for c in info["cameras"]:
        K = c["K"]
        print(f"  cam {c['camera_id']}: {c['width']}x{c['height']} fx={K[0][0]:.1f} fy={K[1][1]:.1f} "
              f"cx={K[0][2]:.1f} cy={K[1][2]:.1f} centre=({', '.join(f'{v:.3f}' for v in c['center'])}) m"
              + (" distorted" if any(c["distortion"]) else ""))
    for cam_id, reason in info["invalid_cameras"].items():
        print(f"  cam {cam_id}: INVALID: {reason}")
    return 0


def build(args) -> int:
    from dataprep.build_config import BuildConfig
    from pippo_common.redact import redact_config
    from pippo_common.storage import check_store
    from pippo_common.config import load_config, to_dict

    cfg = load_config(BuildConfig, args.config, args.overrides)
    # A dead endpoint or wrong credentials: one line in seconds, before Ray starts.
    for uri in dict.fromkeys([cfg.dataset, *(s.uri for s in cfg.sources)]):
        check_store(uri)
    from dataprep.build.job import run_build

    if args.dry_run:
        plan = run_build(cfg, {}, dry_run=True)
        print(json.dumps(plan) if args.json else
              f"would build {plan['new_inputs']} new inputs in {plan['partitions_to_build']} of "
              f"{plan['partitions']} partitions ({plan['listed']} listed, {plan['gone_inputs']} gone; "
              f"{plan['list_files_skipped']} unchanged list files skipped; parent {plan['parent'] or '-'})")
        return 0
    # The version record keeps the config as written: expanded ${VAR}s (tokens) go back to
    # ${VAR}, URL credentials are masked.
    vid = run_build(cfg, redact_config(to_dict(cfg)))
    _warn_if_empty(cfg.dataset, vid)
    print(vid)
    return 0


def _warn_if_empty(dataset: str, vid: str) -> None:
    """A version that keeps no sample is committed (its ledger says why), but never silently."""
    from pippo_common.errors import DataError
    from dataprep.store.core import DatasetStore

    try:
        record = DatasetStore(dataset).resolve(vid)
    except DataError:
        return
    if record.get("samples") == 0:
        reasons = record.get("stats", {}).get("rejected_by_reason", {})
        top = max(reasons, key=reasons.get) if reasons else "-"
        log.warning("version %s keeps 0 samples: all %s inputs were rejected (most often: %s); "
                    "see `pippo data show %s@%s`", vid, record.get("rejected", 0), top, dataset, vid)


def _open_store(uri: str):
    """The dataset store at `uri`, its object store checked first (fails fast, one line)."""
    from pippo_common.storage import check_store
    from dataprep.store.core import DatasetStore

    check_store(uri)
    return DatasetStore(uri)


def _store_and_ref(ref: str):
    from dataprep.store.core import split_ref
    uri, name = split_ref(ref)
    return _open_store(uri), name


def versions(args) -> int:
    from pippo_common.redact import strip_credentials

    rows = _open_store(args.uri).versions()
    if args.json:
        print(json.dumps([{k: v[k] for k in ("id", "parent", "created", "tags", "samples", "rejected")}
                          for v in rows]))
        return 0
    if not rows:
        print(f"{strip_credentials(args.uri)}: no versions")
    for v in rows:
        tags = f" [{', '.join(v['tags'])}]" if v["tags"] else ""
        print(f"{v['id']}  {v['created']}  {v['samples']:>8} samples  {v['rejected']:>6} rejected  "
              f"{v.get('shards_total', 0):>4} shards  parent {v['parent'] or '-'}{tags}")
    return 0


SPEC_KEYS = ("id", "parent", "created", "tags", "samples", "rejected", "shards", "rejects_url",
                    "preview_url", "config", "code_version")


def show(args) -> int:
    from pippo_common.redact import redact_config

    store, ref = _store_and_ref(args.ref)
    v = store.describe(store.resolve(ref))
    v["config"] = redact_config(v.get("config"))    # records of older builds kept it expanded
    if args.json:
        print(json.dumps({**{k: v.get(k) for k in SPEC_KEYS}, **{k: v[k] for k in v if k not in SPEC_KEYS}}))
        return 0
    st = v.get("stats", {})
    print(f"version {v['id']} of {store.uri}")
    print(f"  created {v['created']}  parent {v['parent'] or '-'}  tags {', '.join(v['tags']) or '-'}")
    print(f"  {v['samples']} samples ({st.get('samples_by_kind', {})}), {v['rejected']} rejected, "
          f"{len(v['shards'])} shards, {st.get('bytes', 0) / 1e6:.1f} MB")
    if v.get("counts", {}).get("removed"):
        print(f"  {v['counts']['removed']} inputs removed (gone from their source, or taken down)")
    for reason, n in sorted(st.get("rejected_by_reason", {}).items(), key=lambda kv: -kv[1]):
        print(f"    rejected {n:>6}  {reason}")
    print(f"  {st.get('parts', '?')} parts (list: {v['rejects_url']}; the ledger: `pippo data rejects`)\n"
          f"  preview {v['preview_url']}")
    return 0


def diff(args) -> int:
    from dataprep.store.core import diff as version_diff

    store_a, ref_a = _store_and_ref(args.a)
    store_b, ref_b = _store_and_ref(args.b)
    d = version_diff(store_a.describe(store_a.resolve(ref_a)), store_b.describe(store_b.resolve(ref_b)))
    if args.json:
        print(json.dumps(d))
        return 0
    print(f"{d['from']} -> {d['to']}: +{len(d['shards_added'])} shards (+{d['samples_added']} samples), "
          f"-{len(d['shards_removed'])} shards (-{d['samples_removed']} samples); "
          f"{d['samples_from']} -> {d['samples_to']} samples")
    for s in d["shards_added"]:
        print(f"  + {s['url']} ({s['samples']})")
    for s in d["shards_removed"]:
        print(f"  - {s['url']} ({s['samples']})")
    return 0


def tag(args) -> int:
    store, ref = _store_and_ref(args.ref)
    vid = store.tag(ref, args.name)
    print(vid)
    return 0


def gc(args) -> int:
    from dataprep.store.gc import collect

    result = collect(_open_store(args.uri), keep_last=args.keep_last, grace_s=args.grace_seconds, dry_run=args.dry_run)
    for path in result["files"]:
        print(f"  would delete {path}")
    print(f"{'would delete' if args.dry_run else 'deleted'} {result['deleted']} files; kept "
          f"{result['kept_young']} unreferenced files younger than {args.grace_seconds:g}s; left "
          f"{result['foreign']} foreign files alone; {'would un-list' if args.dry_run else 'un-listed'} "
          f"{len(result['versions_dropped'])} versions")
    return 0


def untag(args) -> int:
    store, _ = _store_and_ref(args.uri + "@latest")
    print(store.untag(args.name))
    return 0


def compact(args) -> int:
    from dataprep.build.maintenance import compact as compact_version

    store, ref = _store_and_ref(args.ref)
    vid, info = compact_version(store, ref, min_fill=args.min_fill)
    print(f"compacted: {info['parts_before']} -> {info['parts_after']} parts, {info['merged_shards']} small "
          "shards merged", file=sys.stderr)
    print(vid)
    return 0


def remove(args) -> int:
    from dataprep.build.maintenance import remove_inputs

    store, ref = _store_and_ref(args.ref)
    vid, info = remove_inputs(store, ref, args.inputs)
    print(f"removed {info['removed']} inputs ({info['not_found']} listed inputs were not in the version)",
          file=sys.stderr)
    print(vid)
    return 0


def rejects(args) -> int:
    """The ledger rows of a version that are not kept, as JSON lines."""
    from dataprep.store.ledger import ledger as replayed_ledger

    store, ref = _store_and_ref(args.ref)
    ledger = replayed_ledger(store, store.resolve(ref))
    for row in ledger.to_pylist():
        if row["status"] != "kept":
            print(json.dumps({k: row[k] for k in ("input", "status", "stage", "reason", "attempts")}))
    return 0
