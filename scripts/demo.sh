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
echo "== 4. three training stages on Ray Train + DeepSpeed ZeRO (2 workers), tracked in MLflow" >&2
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/.pippo/mlflow.db} MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
ds="dataset=$STORE/datasets/demo@$vid"
pre=$($pippo train configs/stages/pretrain.yaml "$ds" steps=${DEMO_STEPS:-60} | tail -n 1)
mid=$($pippo train configs/stages/mid.yaml "$ds" steps=${DEMO_STEPS:-60} init_from="$pre" \
      deepspeed=configs/deepspeed/zero3.json | tail -n 1)
post=$($pippo train configs/stages/post.yaml "$ds" steps=${DEMO_STEPS:-60} init_from="$mid" | tail -n 1)
.venv/bin/python - "$OUT" <<'PY'
import sys, mlflow
client = mlflow.MlflowClient()
for stage in ("pretrain", "mid", "post"):
    run = mlflow.search_runs(experiment_names=["pippo-demo"], filter_string=f"tags.`pippo.step` = '{stage}'",
                             order_by=["attributes.start_time DESC"], max_results=1, output_format="list")[0]
    grids = sorted(a.path for a in client.list_artifacts(run.info.run_id, "samples"))
    if grids:
        import os, shutil
        local = client.download_artifacts(run.info.run_id, grids[-1], sys.argv[1])
        shutil.move(local, os.path.join(sys.argv[1], f"samples_{stage}.png"))
    print(f"{stage}: loss {run.data.metrics.get('train/loss'):.4f}, run {run.info.run_id}, "
          f"checkpoint {run.data.tags.get('pippo.checkpoint')}", file=sys.stderr)
PY
echo "demo done: $OUT/capture_*.png (captures with anchors), $OUT/dataset_preview.png (version $vid)," >&2
echo "  $OUT/samples_{pretrain,mid,post}.png (reference | ground truth | DDIM samples of held-out samples)," >&2
echo "  checkpoints: $post; MLflow: .venv/bin/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI" >&2
