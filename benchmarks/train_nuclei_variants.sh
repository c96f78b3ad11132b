#!/usr/bin/env bash
# Ablation of the instance variants on the DSB 2018 nuclei data: train on dsb2018-train (5% of it held out,
# chosen by --seed, to tune each model's post-processing), score on the 32 images of dsb2018-sample, which
# no variant ever sees, with `unet predict --output-type labels` and no other flag (the model's own tuned
# decoding) and `unet evaluate --metrics f1,ap,precision,recall`.
#
#   benchmarks/train_nuclei_variants.sh [OUT_DIR]
#   VARIANTS="three-class two-class" STEPS=1000 BASE=16 benchmarks/train_nuclei_variants.sh /tmp/variants
#   BALANCE=none VARIANTS=three-class benchmarks/train_nuclei_variants.sh /tmp/variants-nobalance
#
# Run it alone on the machine: the training times it prints are wall-clock.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DATA="${DATA:-$HERE/../../shared/data}"
OUT="${1:-runs/nuclei-variants}"
UNET="${UNET:-python -m unetcli}"
VARIANTS="${VARIANTS:-three-class two-class}"
STEPS="${STEPS:-1000}"
BASE="${BASE:-16}"
STAGE="${STAGE:-all}"
BALANCE="${BALANCE:-dataset}"
mkdir -p "$OUT"

for variant in $VARIANTS; do
  run="$OUT/$variant"
  if [[ "$STAGE" == all || "$STAGE" == train ]]; then
    rm -rf "$run"
    start=$(date +%s)
    $UNET train --images "$DATA/dsb2018-train/images" --labels "$DATA/dsb2018-train/labels" \
      --target "$variant" --w0 10 --sigma 5 --balance "$BALANCE" --border-width 2 \
      --base "$BASE" --depth 4 --padding same --batchnorm --tile 256 --batch 4 \
      --optimizer adam --lr 0.001 --schedule cosine --iterations "$STEPS" --precision bf16 \
      --scale-range 0.7,1.4 --val-split 0.05 --val-metric f1 \
      --workers 0 --seed 0 --checkpoint-every 250 --out "$run" > /dev/null
    echo "$variant: training wall time $(( $(date +%s) - start )) s, $STEPS steps"
  fi
  if [[ "$STAGE" == all || "$STAGE" == score ]]; then
    rm -rf "$run/pred" && mkdir -p "$run/pred"
    $UNET predict "$DATA"/dsb2018-sample/images/* --model "$run/best.unet" --output-type labels \
      -o "$run/pred/" > /dev/null
    $UNET evaluate "$run/pred/" --truth "$DATA/dsb2018-sample/labels/" --metrics f1,ap,precision,recall \
      --json > "$run/scores.json"
    python - "$run/scores.json" "$variant" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["mean"]
print(f"{sys.argv[2]}: " + "  ".join(f"{k} {m[k]:.4f}" for k in ("f1", "ap", "precision", "recall") if k in m))
PY
  fi
done
