"""`pippo eval reprojection DIR`: the reprojection error of a folder of views with known cameras
(pipelines.reprojection reads and measures it). Training-time evaluation runs as a workflow step
(pipelines.evaluation)."""
from __future__ import annotations

import json

from pipelines.cli.args import add_command, add_group, json_flag


def register(top) -> None:
    esub = add_group(top, "eval", "evaluation", "Evaluation commands.", "eval_command")
    p = add_command(esub, "reprojection", eval_reprojection,
                    "reprojection error of a set of views with known cameras",
                    "DIR holds cameras.json ({'views': [{K, R, t, height, width}]}) and view00.png, "
                    "view01.png, ... Prints RE as % of max(H, W).")
    p.add_argument("dir", help="directory of views")
    json_flag(p)


def eval_reprojection(args) -> int:
    from pipelines.reprojection import measure
    from pippo_model.metrics.reprojection import NotMeasurable

    try:
        images, result = measure(args.dir)
    except NotMeasurable as exc:
        # A measurement with no number is still an answer (e.g. generated views too inconsistent
        # to match): the document with nulls and the reason, exit 0; scripts test re_pct for null.
        doc = {"re_pct": None, "re_px": None, "pairs": 0, "reason": str(exc)}
        print(json.dumps(doc) if args.json else f"reprojection error: not measurable: {exc}")
        return 0
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    h, w = images[0].shape[:2]
    print(f"reprojection error: {result.re_pct:.3f}% of max(H, W) = {result.re_px:.3f} px "
          f"over {result.pairs} view pairs ({len(images)} views, {w}x{h})")
    for (i, j), err in sorted(result.per_pair.items()):
        print(f"  view{i:02d} - view{j:02d}: {err:.3f} px, {result.matches[(i, j)]} matches")
    return 0
