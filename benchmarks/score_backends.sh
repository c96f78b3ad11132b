#!/usr/bin/env bash
# Quality of every inference path (issue 17): `unet predict` with its defaults (--backend auto,
# --precision auto) against torch fp32, on data the models never saw.
#
#   benchmarks/score_backends.sh ISBI_MODEL [OUT_DIR]
#   benchmarks/score_backends.sh runs/isbi-valid/last.unet /tmp/backend-scores
#
# ISBI 2012 slices 25-29 with the benchmark model (trained on 00-24 by benchmarks/train_isbi.sh),
# scored by V_rand and V_info (thinned, thresholds swept), with and without --tta; and the 32 images of
# dsb2018-sample with the shipped nuclei model (its tuned decoding), scored by object F1 and DSB AP.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DATA="${DATA:-$HERE/../../shared/data}"
MODEL="${1:?give the ISBI benchmark model (runs/isbi-valid/last.unet)}"
OUT="${2:-runs/backend-scores}"
UNET="${UNET:-python -m unetcli}"
mkdir -p "$OUT/truth"
for i in 25 26 27 28 29; do cp "$DATA/isbi2012/train/labels/$i.png" "$OUT/truth/$i.png"; done
imgs=(); for i in 25 26 27 28 29; do imgs+=("$DATA/isbi2012/train/images/$i.png"); done

declare -A PATHS=([default]="" [torch-fp32]="--backend torch --precision fp32")
for name in torch-fp32 default; do
  for tta in "" "--tta"; do
    tag="isbi-$name${tta:+-tta}"
    rm -rf "$OUT/$tag" && mkdir -p "$OUT/$tag"
    start=$(date +%s.%N)
    # shellcheck disable=SC2086
    $UNET predict "${imgs[@]}" --model "$MODEL" --output-type probs $tta ${PATHS[$name]} -o "$OUT/$tag/" > /dev/null
    sec=$(python -c "import time,sys; print(f'{time.time()-float(sys.argv[1]):.1f}')" "$start")
    $UNET evaluate "$OUT/$tag/" --truth "$OUT/truth/" --metrics vrand,vinfo --json > "$OUT/$tag.json"
    python - "$OUT/$tag.json" "$tag" "$sec" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["mean"]
print(f"{sys.argv[2]:<24} V_rand {m['vrand']:.4f}  V_info {m['vinfo']:.4f}  ({sys.argv[3]} s for 5 slices)")
PY
  done
  tag="nuclei-$name"
  rm -rf "$OUT/$tag" && mkdir -p "$OUT/$tag"
  # shellcheck disable=SC2086
  $UNET predict "$DATA"/dsb2018-sample/images/* --model nuclei --output-type labels ${PATHS[$name]} -o "$OUT/$tag/" > /dev/null
  $UNET evaluate "$OUT/$tag/" --truth "$DATA/dsb2018-sample/labels/" --metrics f1,ap --json > "$OUT/$tag.json"
  python - "$OUT/$tag.json" "$tag" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["mean"]
print(f"{sys.argv[2]:<24} F1 {m['f1']:.4f}  AP {m['ap']:.4f}")
PY
done
