#!/usr/bin/env bash
# The main job on the embedded defaults: the demo workflow (configs/pipelines/demo.yaml) end to end
# on synthetic data — synthetic captures and photos -> a dataset version -> pretrain -> mid -> post
# (Ray Train + DeepSpeed ZeRO, 2 workers) -> eval -> compare — then a turnaround of a real photo.
# No server, no download. Outputs: ./out/demo, the object store ${PIPPO_STORE:-./.pippo/store},
# MLflow in ./.pippo/mlflow.db. Re-running it reuses every finished step (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=out/demo
pippo=.venv/bin/pippo
export PIPPO_STORE=${PIPPO_STORE:-./.pippo/store}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/.pippo/mlflow.db}
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
mkdir -p "$OUT" .pippo

echo "== 1. the demo workflow: synth -> dataprep -> pretrain -> mid -> post -> eval (cached, resumable)" >&2
$pippo pipeline run configs/pipelines/demo.yaml "$@" | tee "$OUT/pipeline.txt"
output() { awk -v s="$1" '$1 == s {print $NF}' "$OUT/pipeline.txt"; }
version=$(output dataprep)
post=$(output post)

echo "== 2. the dataset version and its captures" >&2
$pippo data show "$version"
$pippo data show "$version" --json > "$OUT/version.json"
captures=$(ls -td out/pipelines/demo/data-*/captures | head -n 1)
for cap in "$captures"/*/; do
  $pippo data inspect "$cap" --preview "$OUT/capture_$(basename "$cap").png" > /dev/null
done
.venv/bin/python - "$version" "$OUT/dataset_preview.png" <<'PY'
import sys, shutil, fsspec
from dataprep.store.core import DatasetStore, split_ref
uri, ref = split_ref(sys.argv[1])
store = DatasetStore(uri)
with fsspec.open(store.describe(store.resolve(ref))["preview_url"], "rb") as f, open(sys.argv[2], "wb") as out:
    shutil.copyfileobj(f, out)
PY
# versions are lists of parts: compaction makes a version with the same samples in fewer parts
# and full shards; gc --dry-run lists what no version references (nothing is deleted here)
dataset=${version%@*}
$pippo data rejects "$version" > "$OUT/rejects.jsonl"; head -n 3 "$OUT/rejects.jsonl"
$pippo data compact "$version"
$pippo data gc "$dataset" --dry-run | tail -n 1

echo "== 3. the model and its 3D-consistency metric" >&2
$pippo model info configs/models/tiny.yaml
$pippo data synth-views "$OUT/gt_views" --views 24 > /dev/null
echo "reprojection error of ground-truth views (the metric's noise floor):" >&2
$pippo eval reprojection "$OUT/gt_views"

echo "== 4. a held-out frame from every camera: generated row over ground-truth row (post checkpoint)" >&2
# cached by checkpoint: a re-run with the same post model reuses the strip (seconds)
.venv/bin/python - "$post" "$version" "$OUT/heldout_turnaround.png" <<'PY'
import json, os, sys
from pipelines.evaluation import EvalConfig, turnaround_strip
post, version, path = sys.argv[1:]
stamp = path + ".json"
if os.path.exists(path) and os.path.exists(stamp) and json.load(open(stamp)).get("checkpoint") == post:
    r = json.load(open(stamp))
else:
    r = turnaround_strip(EvalConfig(checkpoint=post, dataset=version, holdout_fraction=0.25, views=16,
                                    resolution=64, steps=20, guidance=1.0), path)
    r["checkpoint"] = post
    with open(stamp + ".tmp", "w") as f:
        json.dump(r, f)
    os.replace(stamp + ".tmp", stamp)
print(f"held-out frame {r['key']} at its {r['views']} cameras: {r['path']} (top: generated, bottom: ground "
      f"truth; red bar: cameras never seen in training): PSNR {r['psnr']:.1f} dB, "
      f"{r['psnr_heldout_cameras']:.1f} dB at the held-out cameras", file=sys.stderr)
PY

echo "== 5. one real photo -> a turnaround (scikit-image's astronaut, post checkpoint)" >&2
echo "   (out of distribution: the model was trained on one synthetic figure; this shows the real-photo path)" >&2
.venv/bin/python -c "import skimage.data, PIL.Image; PIL.Image.fromarray(skimage.data.astronaut()).save('$OUT/astronaut.png')"
$pippo sample --checkpoint "$post" --image "$OUT/astronaut.png" --views 8 --steps 20 --out "$OUT/turnaround.gif" > /dev/null

echo "== 6. compare the runs in MLflow (the stages' eval metrics side by side)" >&2
$pippo compare --experiment pippo-demo --out "$OUT/compare"

echo "demo done. Look at:" >&2
echo "  $OUT/heldout_turnaround.png (a held-out frame: generated over ground truth)," >&2
echo "  $OUT/turnaround.gif (+ .mp4, turnaround_views/; out of distribution), $OUT/compare/*.png (loss curves, eval metrics)," >&2
echo "  $OUT/capture_*.png (captures with anchors), $OUT/dataset_preview.png (version $version)," >&2
echo "  MLflow: .venv/bin/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI  (experiment pippo-demo)" >&2
