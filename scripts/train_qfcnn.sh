#!/usr/bin/env bash
# Train the shipped TFHE models (quantization-aware FCNNs) exactly as recorded in their cards.
# Needs the MedMNIST files: MEDHE_DATA=/path/to/data (see docs); each run takes a few minutes on 1 CPU core.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-src/medhe/pretrained}

$PY -m medhe recipe qfcnn --dataset pneumoniamnist --out "$OUT/pneumoniamnist-qfcnn" \
    --hidden 16 --quant-bits 3 --input-bits 3 --act-bits 4 --acc-bits 5 --pool 2 --l1 1.0 \
    --jitter 0.2 --balanced --epochs 25 --seed 0
$PY -m medhe recipe qfcnn --dataset breastmnist --out "$OUT/breastmnist-qfcnn" \
    --hidden 16 --quant-bits 3 --input-bits 3 --act-bits 4 --acc-bits 5 --pool 2 --l1 1.0 \
    --jitter 0.2 --epochs 60 --seed 0
# issue 34: worst-case hidden accumulator within 5 bits, so one exact lookup per neuron (16 PBS, no rounding)
$PY -m medhe recipe qfcnn --dataset pneumoniamnist --out "$OUT/pneumoniamnist-qfcnn-lut" --name pneumoniamnist-qfcnn-lut \
    --hidden 16 --quant-bits 2 --input-bits 1 --act-bits 4 --acc-bits 5 --pool 2 --l1 3 \
    --jitter 0.2 --balanced --epochs 25 --seed 2
