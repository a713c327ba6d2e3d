#!/usr/bin/env bash
# The main job on the embedded defaults: everything the pipeline can do today, end to end, on
# synthetic data (no server, no download). Outputs land in ./out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/demo}
pippo=.venv/bin/pippo
mkdir -p "$OUT"
$pippo data synth-captures "$OUT/captures" --captures 2 --cameras 8 --frames 2 --height 256 --width 168
$pippo data synth-images "$OUT/photos" --count 24
for cap in "$OUT"/captures/*/; do
  name=$(basename "$cap")
  $pippo data inspect "$cap" --preview "$OUT/preview_${name}.png"
done
echo "demo: previews in $OUT/preview_*.png, captures in $OUT/captures, photos in $OUT/photos"
