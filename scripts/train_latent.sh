#!/usr/bin/env bash
# Reproduce the latent pipeline (P1): VQ autoencoders for f2/f4/f8/f16, the shipped vq-f8 and cxr14-latent,
# and the per-factor table. CPU only, one torch thread per step (the machine is shared); ~1-2 h in all.
# Usage: MEDHE_DATA=/path/to/data scripts/train_latent.sh [runs/latent]
set -euo pipefail
RUNS=${1:-runs/latent}
PY=${PYTHON:-python}
export MEDHE_DATA=${MEDHE_DATA:-../shared/data}
export PYTHONUNBUFFERED=1
mkdir -p "$RUNS"

# 1. one autoencoder per factor (each stops after the epoch that passes its time budget)
"$PY" -m medhe train-autoencoder --factor 8 --epochs 20 --max-minutes 25 --out "$RUNS/vq-f8" \
    --recon-png "$RUNS/vq-f8-recon.png"
for F in 16 4 2; do
    "$PY" -m medhe train-autoencoder --factor "$F" --epochs 12 --max-minutes 12 --out "$RUNS/vq-f$F" \
        --recon-png "$RUNS/vq-f$F-recon.png"
done

# 2. ship the f8 autoencoder and train the default latent classifier on its latents
rm -rf src/medhe/pretrained/vq-f8 && cp -r "$RUNS/vq-f8" src/medhe/pretrained/vq-f8
"$PY" -m medhe experiment latent-export --autoencoder src/medhe/pretrained/vq-f8 --out "$RUNS/cxr14-latent"
rm -rf src/medhe/pretrained/cxr14-latent && cp -r "$RUNS/cxr14-latent" src/medhe/pretrained/cxr14-latent

# 3. the P1 table: every factor plus pixel space, plain and under CKKS (f8 row = the shipped cxr14-latent).
#    Each encrypted row needs ~9 GB of memory at N=32768 (evaluation keys); --enc-limit bounds the time per row,
#    --plan-only compiles without keys where memory or time is short.
"$PY" -m medhe experiment latent --autoencoders "$RUNS" --out "$RUNS/experiment" --enc-limit 10
