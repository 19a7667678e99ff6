#!/usr/bin/env bash
# Retrain and export the bundles shipped in models/ (the commands behind docs/models.md).
# On 2 CPU cores: detection about 55 min, retrieval features about 6 min + training 5 min.
# The exact resolved configuration of each shipped bundle is in its manifest.json.
set -euo pipefail
images=${1:-../shared/datasets/dev}
cf=.venv/bin/copyfree

$cf train detect --images "$images" --out artifacts/detect-cvae \
  --epochs 10 --batch-size 64 --bf16 --threads 2
$cf export detect --checkpoint artifacts/detect-cvae/checkpoint.pt \
  --images "$images" --out models/detect-cvae
.venv/bin/python -m copyfree_train.quick_eval_detect models/detect-cvae --limit 400

$cf train retrieve --images "$images" --out artifacts/retrieve/tbh16-sim \
  --bits 16 --cache-dir artifacts/retrieve/features
$cf export retrieve --checkpoint artifacts/retrieve/tbh16-sim/best.pt \
  --out models/retrieve-tbh16
