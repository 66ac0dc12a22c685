#!/usr/bin/env bash
# Reproduce the latent pipeline (P1): VQ autoencoders for f2/f4/f8/f16 trained to one budget, and the per-factor
# table. CPU only, one torch thread per step (the machine is shared).
# Usage: MEDHE_DATA=/path/to/data scripts/train_latent.sh [runs/latent]
#
# The shipped vq-f8 / cxr14-latent are NOT rebuilt here: they come from an earlier, wall-clock-budgeted run
# (7 epochs; `medhe experiment latent-export --autoencoder src/medhe/pretrained/vq-f8 --out runs/latent/cxr14-latent`
# retrains the classifier on it). covid-cxr-ckks: scripts/train_covid_ckks.sh (it reuses $RUNS/vq-f8).
set -euo pipefail
RUNS=${1:-runs/latent}
PY=${PYTHON:-python}
EPOCHS=${EPOCHS:-16}
export MEDHE_DATA=${MEDHE_DATA:-../shared/data}
export PYTHONUNBUFFERED=1
mkdir -p "$RUNS"

# 1. one autoencoder per factor, all to the same budget in epochs (same data: NIH train + COVID train splits, same
#    128px crops, schedule and seed; no wall-clock stop, so a loaded machine cannot shorten one factor's training)
for F in 8 16 4 2; do
    [ -f "$RUNS/vq-f$F/autoencoder.json" ] && continue
    "$PY" -m medhe train-autoencoder --factor "$F" --epochs "$EPOCHS" --max-minutes 100000 --threads 1 \
        --out "$RUNS/vq-f$F" --recon-png "$RUNS/vq-f$F-recon.png"
done

# 2. the P1 table: every factor plus pixel space (64 and 256), one classifier (latent-hecnn, width 8) for every row.
#    Plain pass first (trains the row models; selection on val, test scored once) ...
"$PY" -m medhe experiment latent --autoencoders "$RUNS" --out "$RUNS/experiment" --no-encrypted
#    ... then the encrypted pass on the same models (needs the multi-ciphertext CKKS engine for f2 and pixel 256;
#    ~9 GB of memory per row at N=32768; --enc-limit bounds the time per row).
"$PY" -m medhe experiment latent --autoencoders "$RUNS" --out "$RUNS/experiment" --reuse --enc-limit 10
