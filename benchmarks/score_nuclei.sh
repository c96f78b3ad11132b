#!/usr/bin/env bash
# Score a nuclei model on the 32 images of dsb2018-sample (which no model of this project learns from):
# `unet predict --output-type labels` with no other flag (the model's tuned decoding) and with --untuned
# (the plain defaults), each scored by `unet evaluate --metrics f1,ap,precision,recall`.
#
#   benchmarks/score_nuclei.sh MODEL [OUT_DIR]
#   benchmarks/score_nuclei.sh pretrained/nuclei.unet /tmp/nuclei-scores
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DATA="${DATA:-$HERE/../../shared/data/dsb2018-sample}"
MODEL="${1:?give a model file or name}"
OUT="${2:-runs/nuclei-scores}"
UNET="${UNET:-python -m unetcli}"

for mode in tuned untuned; do
  rm -rf "$OUT/$mode" && mkdir -p "$OUT/$mode"
  start=$(date +%s)
  $UNET predict "$DATA"/images/* --model "$MODEL" --output-type labels "--$mode" -o "$OUT/$mode/" > /dev/null
  seconds=$(( $(date +%s) - start ))
  $UNET evaluate "$OUT/$mode/" --truth "$DATA/labels/" --metrics f1,ap,precision,recall --json > "$OUT/$mode.json"
  python - "$OUT/$mode.json" "$mode" "$seconds" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["mean"]
print(f"{sys.argv[2]}: " + "  ".join(f"{k} {m[k]:.4f}" for k in ("f1", "ap", "precision", "recall")) +
      f"  ({sys.argv[3]} s for 32 images)")
PY
done
