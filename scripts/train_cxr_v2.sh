#!/usr/bin/env bash
# Reproduce the v2 chest X-ray models (issue #28): covid-cxr-ckks v2, pneumonia-cxr-ckks, cxr14-ckks.
# Usage: MEDHE_DATA=/path/to/data scripts/train_cxr_v2.sh [runs/v2]
# Each target trains its variants on train, selects on val, scores test once and exports to RUNS/TARGET/model;
# covid-cxr-ckks' latents come from the f8 encoder in the shipped covid-cxr-ckks (the same weights in v1 and v2).
# The shipped models were made with the variant lists in each card's training.command (a subset of the recipe's).
set -euo pipefail
RUNS=${1:-runs/v2}
PY=${PYTHON:-python}
export MEDHE_DATA=${MEDHE_DATA:-../shared/data}
export PYTHONUNBUFFERED=1

"$PY" -m medhe recipe cxr-ckks covid-cxr-ckks --out "$RUNS/covid-cxr-ckks" --variants w16-shift2 w16-shift2-e48
"$PY" -m medhe recipe cxr-ckks pneumonia-cxr-ckks --out "$RUNS/pneumonia-cxr-ckks" --variants px128-w8-shift4
"$PY" -m medhe recipe cxr-ckks cxr14-ckks --out "$RUNS/cxr14-ckks"
for m in covid-cxr-ckks pneumonia-cxr-ckks cxr14-ckks; do
    rm -rf "src/medhe/pretrained/$m" && cp -r "$RUNS/$m/model" "src/medhe/pretrained/$m"
    "$PY" -m medhe calibrate "$m"            # temperature + conformal scores, fitted on val
    "$PY" -m medhe evaluate --model "$m" --json "$RUNS/$m-plain-test.json"
done
# encrypted: an even sample of each test split (the whole splits take hours on a 2-core machine without IFMA)
for m in covid-cxr-ckks pneumonia-cxr-ckks cxr14-ckks; do
    "$PY" -m medhe evaluate --model "$m" --scheme ckks --sample 60 --json "$RUNS/$m-ckks-test-sample60.json"
done
