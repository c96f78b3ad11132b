#!/usr/bin/env bash
# Rebuild the shipped models from the shared data: train, store in half precision, refresh the example.
#
#   pretrained/train.sh em-membranes      # 60 min on a 2-core CPU: all 30 ISBI 2012 training slices
#   pretrained/train.sh nuclei            # the 32 images of the shared nuclei sample
#
# Needs ../shared/data beside the checkout (DATA= overrides it). Run it alone on the machine: the
# budgets are wall-clock time. The model cards (NAME.md) state the scores of the same recipes trained
# on a held-out split (benchmarks/train_isbi.sh, benchmarks/train_nuclei.sh).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DATA="${DATA:-$HERE/../../shared/data}"
UNET="${UNET:-python -m unetcli}"
RUNS="${RUNS:-runs}"
what="${1:?say em-membranes or nuclei}"

half() {   # store a run's last.unet with float16 weights (the provenance of the training run is kept)
  python - "$1" "$2" <<'PY'
import sys
from unetcli.checkpoint import load_model, save_model
mf = load_model(sys.argv[1])
save_model(sys.argv[2], mf.tensors, mf.config, normalization=mf.normalization,
           class_names=mf.class_names, provenance=mf.provenance, half=True)
PY
}

case "$what" in
  em-membranes)
    start=$(date +%s)
    $UNET train --images "$DATA/isbi2012/train/images" --labels "$DATA/isbi2012/train/labels" \
      --base 32 --depth 4 --padding same --no-batchnorm --tile 512 --batch 1 \
      --optimizer adam --lr 0.001 --schedule cosine ${LENGTH:---max-time 60m} \
      --augmentations flip,elastic --weights none --workers 1 --seed 0 --checkpoint-every 100 \
      --out "$RUNS/em-membranes"
    echo "training wall time: $(( $(date +%s) - start )) s"
    half "$RUNS/em-membranes/last.unet" "$HERE/em-membranes.unet"
    # the example of the README and of tests/test_shipped.py: a test slice (never trained on)
    $UNET predict "$HERE/examples/isbi-test-00.png" -o "$HERE/examples/isbi-test-00-mask.png" \
      --model "$HERE/em-membranes.unet"
    ;;
  nuclei)
    start=$(date +%s)
    $UNET train --images "$DATA/dsb2018-sample/images" --labels "$DATA/dsb2018-sample/labels" \
      --w0 "${W0:-10}" --sigma 5 --balance dataset --border-width 2 \
      --base 16 --depth 4 --padding same --tile 256 --batch 2 \
      --optimizer adam --lr 0.001 --schedule cosine ${LENGTH:---iterations 800} \
      --workers 1 --seed 0 --checkpoint-every 100 --out "$RUNS/nuclei"
    echo "training wall time: $(( $(date +%s) - start )) s"
    half "$RUNS/nuclei/last.unet" "$HERE/nuclei.unet"
    ;;
  *) echo "unknown model $what (em-membranes or nuclei)" >&2; exit 2 ;;
esac
sha256sum "$HERE/$what.unet"
