#!/usr/bin/env bash
# Quality benchmark of `unet train` on ISBI 2012: train on slices 00-24 only, score slices 25-29 with
# `unet predict` + `unet evaluate` (V_rand and V_info after border thinning).
#
#   benchmarks/train_isbi.sh [RUN_DIR]                       # both stages (about 80 min), then score
#   WEIGHTED=0 benchmarks/train_isbi.sh RUN_DIR               # the first stage only
#   STAGE=score benchmarks/train_isbi.sh RUN_DIR             # only score an existing run
#
# The network is the paper's (valid 3x3 convolutions, depth 4) at base 32, trained in bf16. PLAIN
# (default "--iterations 3000") is the length of plain cross-entropy training from scratch (RUN.plain
# when there is a second stage). WEIGHTED (default "--iterations 600"; 0: no second stage) is the
# length of a second stage that fine-tunes that model with the paper's weight map (--weights auto:
# class balance plus the border term w0 = 10, sigma = 5), which puts the weight on the thin membranes
# between cells, the pixels whose errors merge two cells. Lengths are step counts (or --max-time T),
# so the result does not depend on what else runs. benchmarks/README.md has what each variant scored.
#
# Needs ../shared/data/isbi2012 beside the checkout.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DATA="${DATA:-$HERE/../../shared/data/isbi2012}"
RUN="${1:-runs/isbi-bench}"
STAGE="${STAGE:-all}"
UNET="${UNET:-python -m unetcli}"
PLAIN="${PLAIN:---iterations 3000}"   # training length: --iterations N or --max-time T
WEIGHTED="${WEIGHTED:---iterations 600}"   # second stage (weight map); 0: none
mkdir -p "$(dirname "$RUN")"

if [[ "$STAGE" == all || "$STAGE" == train ]]; then
  # Slices 25-29 are left out of the training data entirely (no validation on them either, so
  # nothing about them steers the run), and last.unet is scored.
  split="$RUN.split"
  rm -rf "$split" && mkdir -p "$split/images" "$split/labels"
  for i in $(seq -w 0 24); do
    ln -s "$DATA/train/images/$i.png" "$split/images/$i.png"
    ln -s "$DATA/train/labels/$i.png" "$split/labels/$i.png"
  done
  start=$(date +%s)
  first="$RUN"
  [[ "$WEIGHTED" != 0 ]] && first="$RUN.plain"
  $UNET train --images "$split/images" --labels "$split/labels" \
    --base 32 --depth 4 --padding valid --no-batchnorm --tile 572 --batch 1 --precision bf16 \
    --optimizer adam --lr 0.001 --schedule cosine $PLAIN \
    --augmentations flip,elastic --weights none --workers 0 --seed 0 --checkpoint-every 100 \
    --quiet --out "$first"
  echo "stage 1 wall time (data preparation included): $(( $(date +%s) - start )) s"
  if [[ "$WEIGHTED" != 0 ]]; then
    $UNET train --images "$split/images" --labels "$split/labels" --init "$first/last.unet" \
      --tile 572 --batch 1 --precision bf16 --optimizer adam --lr 0.0001 --schedule cosine $WEIGHTED \
      --augmentations flip,elastic --weights auto --w0 10 --sigma 5 --workers 0 --seed 1 \
      --checkpoint-every 100 --quiet --out "$RUN"
  fi
  echo "training wall time, all stages (data preparation included): $(( $(date +%s) - start )) s"
fi

if [[ "$STAGE" == all || "$STAGE" == score ]]; then
  tmp="$RUN/score"
  mkdir -p "$tmp/pred" "$tmp/truth"
  for i in 25 26 27 28 29; do
    cp "$DATA/train/labels/$i.png" "$tmp/truth/$i.png"
  done
  imgs=()
  for i in 25 26 27 28 29; do imgs+=("$DATA/train/images/$i.png"); done
  start=$(date +%s)
  $UNET predict "${imgs[@]}" --model "$RUN/last.unet" --output-type probs --tta -o "$tmp/pred/"
  echo "prediction wall time (5 slices, TTA): $(( $(date +%s) - start )) s"
  $UNET evaluate "$tmp/pred/" --truth "$tmp/truth/" --json > "$tmp/scores.json"
  python - "$tmp/scores.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
m = d["mean"]
print("mean over slices 25-29:", {k: round(v, 4) for k, v in m.items() if isinstance(v, (int, float))})
print("thresholds:", d.get("thresholds"))
PY
fi
