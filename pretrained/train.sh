#!/usr/bin/env bash
# Rebuild the shipped models from the shared data: train, store in half precision, refresh the example.
#
#   pretrained/train.sh em-membranes      # 75-80 min on one core of a 2-core CPU: all 30 ISBI 2012 training slices
#   pretrained/train.sh nuclei            # the 664 images of the DSB 2018 training set (about 45 min alone)
#
# Needs ../shared/data beside the checkout (DATA= overrides it). Run it alone on the machine: the
# lengths are step counts, so the models do not depend on the machine's speed. The model cards (NAME.md) state the scores of the same recipes trained
# on a held-out split (benchmarks/train_isbi.sh, benchmarks/train_nuclei.sh).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DATA="${DATA:-$HERE/../../shared/data}"
UNET="${UNET:-python -m unetcli}"
RUNS="${RUNS:-runs}"
what="${1:?say em-membranes or nuclei}"

half() {   # store a run's model with float16 weights (provenance, tuned decoding and inputs kept)
  python - "$1" "$2" <<'PY'
import sys
from unetcli.checkpoint import load_model, save_model
mf = load_model(sys.argv[1])
save_model(sys.argv[2], mf.tensors, mf.config, normalization=mf.normalization,
           class_names=mf.class_names, provenance=mf.provenance, postprocess=mf.postprocess,
           inputs=mf.inputs, half=True)
PY
}

case "$what" in
  em-membranes)
    # the paper's network (valid 3x3 convolutions, depth 4, base 32), in two stages: plain
    # cross-entropy from scratch, then a fine-tuning with the paper's weight map (the recipe of
    # benchmarks/train_isbi.sh, whose held-out scores the card gives)
    start=$(date +%s)
    $UNET train --images "$DATA/isbi2012/train/images" --labels "$DATA/isbi2012/train/labels" \
      --base 32 --depth 4 --padding valid --no-batchnorm --tile 572 --batch 1 --precision bf16 \
      --optimizer adam --lr 0.001 --schedule cosine ${LENGTH:---iterations 3000} \
      --augmentations flip,elastic --weights none --workers 0 --seed 0 --checkpoint-every 100 \
      --out "$RUNS/em-membranes"
    $UNET train --images "$DATA/isbi2012/train/images" --labels "$DATA/isbi2012/train/labels" \
      --init "$RUNS/em-membranes/last.unet" --tile 572 --batch 1 --precision bf16 \
      --optimizer adam --lr 0.0001 --schedule cosine ${LENGTH2:---iterations 600} \
      --augmentations flip,elastic --weights auto --w0 10 --sigma 5 --workers 0 --seed 1 \
      --checkpoint-every 100 --out "$RUNS/em-membranes-w"
    echo "training wall time: $(( $(date +%s) - start )) s"
    half "$RUNS/em-membranes-w/last.unet" "$HERE/em-membranes.unet"
    # the example of the README and of tests/test_shipped.py: a test slice (never trained on)
    $UNET predict "$HERE/examples/isbi-test-00.png" -o "$HERE/examples/isbi-test-00-mask.png" \
      --model "$HERE/em-membranes.unet"
    ;;
  nuclei)
    # the recipe of benchmarks/train_nuclei_variants.sh at full length: DSB 2018 stage 1 training set
    # only (664 images, 5% held out to tune the instance decoding); dsb2018-sample is never seen
    start=$(date +%s)
    $UNET train --images "$DATA/dsb2018-train/images" --labels "$DATA/dsb2018-train/labels" \
      --target "${TARGET:-two-class}" --border-width 2 --w0 10 --sigma 5 --balance dataset \
      --base 32 --depth 4 --padding same --batchnorm --tile 256 --batch 4 \
      --optimizer adam --lr 0.001 --schedule cosine ${LENGTH:---iterations 2500} --precision bf16 \
      --scale-range 0.7,1.4 --val-split 0.05 --val-metric f1 --val-every 500 \
      --workers 0 --seed 0 --checkpoint-every 250 --out "$RUNS/nuclei"
    echo "training wall time: $(( $(date +%s) - start )) s"
    half "$RUNS/nuclei/best.unet" "$HERE/nuclei.unet"
    ;;
  *) echo "unknown model $what (em-membranes or nuclei)" >&2; exit 2 ;;
esac
sha256sum "$HERE/$what.unet"
