"""Handlers of `pippo data ...` (argument parsing lives in pipelines.cli)."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("pippo.data")


def synth_captures(args) -> int:
    from dataprep.synth import synth_capture

    out = Path(args.out)
    total = args.captures * args.cameras * args.frames
    with tqdm(total=total, desc="rendering views", unit="view", file=sys.stderr) as bar:
        for k in range(args.captures):
            path = synth_capture(out / f"capture_{args.seed:04d}_{k:03d}", cameras=args.cameras,
                                 frames=args.frames, height=args.height, width=args.width,
                                 seed=args.seed * 1000 + k, fmt=args.format, masks=not args.no_masks,
                                 distortion=args.distortion, progress=bar)
            log.info("wrote capture %s", path)
    print(out)
    return 0


def synth_images(args) -> int:
    from dataprep.synth import synth_images as write_images

    with tqdm(total=args.count, desc="rendering photos", unit="img", file=sys.stderr) as bar:
        paths = write_images(args.out, args.count, args.seed, progress=bar)
    log.info("wrote %d photos to %s", len(paths), args.out)
    print(args.out)
    return 0


def inspect(args) -> int:
    from dataprep.capture import Capture
    from dataprep.preview import frame_contact_sheet, png_bytes
    from dataprep.storage import atomic_write_bytes

    with Capture(args.capture, strict=False) as cap:
        info = cap.describe()
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
