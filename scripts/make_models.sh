#!/usr/bin/env bash
# Retrain and export the bundles shipped in models/ (the commands behind docs/models.md).
# On 2 CPU cores: detection about 55 min + fine-tunes of 12, 7, 16 and 19 min + 2 min of
# calibration, the lite0 alternative 65 min, retrieval features about 6 min + training
# 5 min. The exact resolved configuration of each shipped bundle is in its
# manifest.json ("training").
set -euo pipefail
images=${1:-../shared/datasets/dev}
cf=.venv/bin/copyfree

# Detection: the CVAE with seed-000 augmentations, then a short fine-tune with the
# decorrelation term that spreads the first-key bits (docs/models.md, "Detection").
$cf train detect --images "$images" --out artifacts/detect-cvae \
  --epochs 10 --batch-size 64 --bf16 --threads 2
$cf train detect --images "$images" --out artifacts/detect-cvae-ft \
  --init-from artifacts/detect-cvae/checkpoint.pt --epochs 3 --lr 0.0005 \
  --decorrelation 25 --batch-size 64 --bf16 --threads 2
# Issue 6: views from the attack suite plus the contrastive term, three fine-tunes, then
# thresholds calibrated to 1 % false matches on held-out distractors.
$cf train detect --images "$images" --out artifacts/detect-cvae-con \
  --init-from artifacts/detect-cvae-ft/checkpoint.pt --epochs 4 --lr 0.0005 \
  --decorrelation 25 --batch-size 64 --bf16 --threads 2 --views suite --contrastive 300
$cf train detect --images "$images" --out artifacts/detect-cvae-con2 \
  --init-from artifacts/detect-cvae-con/checkpoint.pt --epochs 10 --lr 0.0005 \
  --decorrelation 25 --batch-size 64 --bf16 --threads 2 --views suite --contrastive 600
$cf train detect --images "$images" --out artifacts/detect-cvae-con3 \
  --init-from artifacts/detect-cvae-con2/checkpoint.pt --epochs 10 --lr 0.0003 \
  --decorrelation 25 --batch-size 64 --bf16 --threads 2 --views suite --contrastive 600
$cf export detect --checkpoint artifacts/detect-cvae-con3/checkpoint.pt \
  --images "$images" --out models/detect-cvae
.venv/bin/python -m copyfree_train.quick_eval_detect models/detect-cvae --limit 400

# The EfficientNet-Lite0 keys, the default bundle since 2026-12-06 (35, 11 and
# 19 min): late stages first, then the whole backbone with look-alike groups in the
# batches, then with 15 % grayscale views (docs/models.md, "Variants").
lite="--model lite0 --contrastive 1 --invariance 0.05 --decorrelation 1 --batch-size 64 --threads 2"
$cf train detect --images "$images" --out artifacts/detect-lite0 $lite \
  --views suite --lr 0.0003 --epochs 12
$cf train detect --images "$images" --out artifacts/detect-lite0-ft $lite \
  --init-from artifacts/detect-lite0/checkpoint.pt --lite-train-from 0 \
  --views suite --lr 0.0001 --epochs 3 --hard-negatives 0.25
$cf train detect --images "$images" --out artifacts/detect-lite0-ft2 $lite \
  --init-from artifacts/detect-lite0-ft/checkpoint.pt --lite-train-from 0 \
  --views suite-colour --lr 0.0001 --epochs 5 --hard-negatives 0.25
$cf export detect --checkpoint artifacts/detect-lite0-ft2/checkpoint.pt \
  --images "$images" --out models/detect-lite0
# Background banks (the training images' keys; held-out images left out), then the
# thresholds, background weight included, of both detection bundles.
for b in models/detect-lite0 models/detect-cvae; do
  $cf background --bundle "$b" --images "$images"
  $cf calibrate --images "$images" --bundle "$b" --target-fmr 0.01 --write
done

# Retrieval: 16-bit TBH without the similarity loss, the better of the two on
# validation at 16 bits (docs/models.md, "Retrieval").
$cf train retrieve --images "$images" --out artifacts/retrieve/eval/runs/tbh16-nosim \
  --bits 16 --no-similarity-loss --cache-dir artifacts/retrieve/features
$cf export retrieve --checkpoint artifacts/retrieve/eval/runs/tbh16-nosim/best.pt \
  --out models/retrieve-tbh16
