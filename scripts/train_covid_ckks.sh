#!/usr/bin/env bash
# Reproduce covid-cxr-ckks v1 (the COVID-19 Radiography subset, superseded by v2: scripts/train_cxr_v2.sh).
# Usage: MEDHE_DATA=/path/to/data scripts/train_covid_ckks.sh [runs/latent] [runs/covid-ckks]
# The client stage is the f8 encoder of scripts/train_latent.sh (trained on the NIH and COVID *train* splits only).
set -euo pipefail
RUNS=${1:-runs/latent}
OUT=${2:-runs/covid-ckks}
PY=${PYTHON:-python}
export MEDHE_DATA=${MEDHE_DATA:-../shared/data}
export PYTHONUNBUFFERED=1

[ -f "$RUNS/vq-f8/autoencoder.json" ] || "$PY" -m medhe train-autoencoder --factor 8 --epochs 16 \
    --max-minutes 100000 --threads 1 --out "$RUNS/vq-f8" --recon-png "$RUNS/vq-f8-recon.png"
# every variant is trained on train and scored on val; only the one chosen on val is scored on test (once)
"$PY" -m medhe experiment covid-ckks --autoencoder "$RUNS/vq-f8" --out "$OUT"
rm -rf src/medhe/pretrained/covid-cxr-ckks && cp -r "$OUT/model" src/medhe/pretrained/covid-cxr-ckks
# acceptance: the whole test split encrypted with the card's CKKS options (N=32768, 2^36; ~9 GB of memory)
"$PY" -m medhe evaluate --model covid-cxr-ckks --scheme ckks --json "$OUT/evaluate-ckks-test.json"
