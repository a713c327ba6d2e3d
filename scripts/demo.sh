#!/usr/bin/env bash
# The main job on the embedded defaults: everything the pipeline can do today, end to end, on
# synthetic data (no server, no download). Outputs land in ./out/demo and the object store
# ${PIPPO_STORE:-./.pippo/store}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=out/demo
pippo=.venv/bin/pippo
STORE=${PIPPO_STORE:-./.pippo/store}
mkdir -p "$OUT"
echo "== 1. synthetic studio captures and photos" >&2
$pippo data synth-captures "$OUT/captures" --captures 2 --cameras 8 --frames 3 --height 384 --width 252
$pippo data synth-images "$OUT/photos" --count 48
for cap in "$OUT"/captures/*/; do
  $pippo data inspect "$cap" --preview "$OUT/capture_$(basename "$cap").png" > /dev/null
done
echo "== 2. Ray build job -> a dataset version (re-running reuses everything)" >&2
vid=$($pippo data build configs/datasets/demo.yaml | tail -n 1)
$pippo data show "$STORE/datasets/demo@$vid"
$pippo data versions "$STORE/datasets/demo"
$pippo data show "$STORE/datasets/demo@$vid" --json > "$OUT/version.json"
cp "$STORE/datasets/demo/versions/$vid/preview.png" "$OUT/dataset_preview.png"
echo "== 3. the model and its 3D-consistency metric" >&2
$pippo model info configs/models/tiny.yaml
$pippo data synth-views "$OUT/gt_views" --views 24 > /dev/null
echo "reprojection error of ground-truth views (the metric's noise floor):" >&2
$pippo eval reprojection "$OUT/gt_views"
echo "demo done: $OUT/capture_*.png (captures with anchors), $OUT/dataset_preview.png (version $vid)" >&2
