#!/usr/bin/env bash
# Ablation of the weight map's border term on the shared nuclei sample (DSB 2018, 32 images):
# train on 24 images, score the other 8 (every 4th image in name order: 0, 4, ..., 28, which mixes the
# fluorescence, brightfield and histology pictures) with object F1 at IoU 0.5 and the Data Science Bowl
# average precision. Two runs that differ only in w0: the paper's border term (w0 = 10, sigma = 5) and
# none (w0 = 0); both keep the class balance w_c and the carved 2-pixel separation borders.
#
#   flock /tmp/unet-bench.lock benchmarks/train_nuclei.sh [OUT_DIR]
#   LENGTH="--iterations 800" W0S="10 0" MIN_SIZE=15 benchmarks/train_nuclei.sh /tmp/nuclei
#
# LENGTH is the length option of `unet train`: a step count (the default) gives the same model
# whatever else runs on the machine; "--max-time 15m" gives a wall-clock budget instead.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DATA="${DATA:-$HERE/../../shared/data/dsb2018-sample}"
OUT="${1:-runs/nuclei-ablation}"
UNET="${UNET:-python -m unetcli}"
LENGTH="${LENGTH:---iterations 800}"
W0S="${W0S:-10 0}"
MIN_SIZE="${MIN_SIZE:-15}"
STAGE="${STAGE:-all}"
mkdir -p "$OUT"

split="$OUT/split"
if [[ ! -d "$split" ]]; then
  mkdir -p "$split/train/images" "$split/train/labels" "$split/test/images" "$split/test/labels"
  i=0
  for f in $(ls "$DATA/images" | sort); do
    part=train; (( i % 4 == 0 )) && part=test
    ln -s "$DATA/images/$f" "$split/$part/images/$f"
    ln -s "$DATA/labels/$f" "$split/$part/labels/$f"
    i=$((i + 1))
  done
fi

for w0 in $W0S; do
  run="$OUT/w0-$w0"
  if [[ "$STAGE" == all || "$STAGE" == train ]]; then
    rm -rf "$run"
    start=$(date +%s)
    $UNET train --images "$split/train/images" --labels "$split/train/labels" \
      --w0 "$w0" --sigma 5 --balance dataset --border-width 2 \
      --base 16 --depth 4 --padding same --tile 256 --batch 2 \
      --optimizer adam --lr 0.001 --schedule cosine $LENGTH \
      --workers 1 --seed 0 --checkpoint-every 100 --out "$run" > /dev/null
    echo "w0=$w0: training wall time $(( $(date +%s) - start )) s"
  fi
  if [[ "$STAGE" == all || "$STAGE" == score ]]; then
    mkdir -p "$run/pred"
    $UNET predict "$split"/test/images/* --model "$run/last.unet" --output-type labels \
      --min-size "$MIN_SIZE" -o "$run/pred/" > /dev/null
    $UNET evaluate "$run/pred/" --truth "$split/test/labels/" --metrics f1,ap,precision,recall \
      --json > "$run/scores.json"
    python - "$run/scores.json" "$w0" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["mean"]
print(f"w0={sys.argv[2]}: " + "  ".join(f"{k} {m[k]:.4f}" for k in ("f1", "ap", "precision", "recall") if k in m))
PY
  fi
done
