"""The camera conditioning reaches the prediction, in exactly the stages that have it, and the
held-out split (frames and cameras) is a pure function of what the samples are (issue #14, item 5).

A camera vector or Plücker map that the model ignores trains without error and samples plausible
images: the only symptom is novel views that do not move with the camera. These tests catch the
wiring: d(prediction)/d(camera vector) and d(prediction)/d(Plücker map).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch


torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


# -- the held-out split ----------------------------------------------------------------------------

_SPLIT = """
import json, sys
from dataprep.loader import holdout_set
from dataprep.samples.make import sample_key
from dataprep.loader.decode import heldout_views
from dataprep.studio.synth import dome_cameras
root = sys.argv[1]
keys = [sample_key(f"cap{c}", f"{f:06d}", input_id=f"{root}/cap{c}/frame{f}") for c in range(3) for f in range(0, 200, 10)]
meta = {"views": [{"camera_id": c.id, "R": c.R.tolist()} for c in dome_cameras(16, 64, 64, seed=3)]}
held = sorted(k.rsplit("_", 1)[0] for k in holdout_set(keys, 0.25))
print(json.dumps({"frames": held, "cameras": heldout_views(meta, 0.25)}))
"""


def _split_in_a_process(root: str, hash_seed: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": hash_seed}
    out = subprocess.run([sys.executable, "-c", _SPLIT, root], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_heldout_split_is_the_same_in_two_processes_and_for_any_source_location():
    """Two processes (different str hash salts) and the same captures read from two locations
    (sample keys end in a hash of the source URL) hold out the same frames and the same cameras;
    a split is neither empty nor everything."""
    a = _split_in_a_process("/data/one", "1")
    b = _split_in_a_process("s3://bucket/elsewhere", "2")
    assert a == b
    assert 0 < len(a["frames"]) < 60 and 0 < len(a["cameras"]) < 16
    assert len(a["cameras"]) == 4          # 25 % of 16 cameras, in pairs of neighbours
