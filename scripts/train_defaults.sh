#!/usr/bin/env bash
# Retrain the shipped default CKKS models exactly as they were trained (deterministic on CPU with one thread).
# Usage: scripts/train_defaults.sh   (needs the MedMNIST files in $MEDHE_DATA, default ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
export MEDHE_DATA="${MEDHE_DATA:-$(cd .. && pwd)/shared/data}"
MEDHE="${MEDHE:-.venv/bin/medhe}"

"$MEDHE" train --dataset pneumoniamnist --arch hecnn --epochs 40 --out src/medhe/pretrained/pneumoniamnist \
  --name pneumoniamnist --threads 1
