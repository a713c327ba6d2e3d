"""Handlers of `pippo data ...` (argument parsing lives in pipelines.cli)."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("pippo.data")


def synth_captures(args) -> int:
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
