#!/usr/bin/env bash
# One call of the GPU `device` tool (about 8 minutes, timeout_s 600): a bigger bundled model
# (13.8 M parameters: hidden 384, 6 layers, 8k vocabulary) and its heads, trained on this machine's
# corpus so that the held-out files are the same here and there. Here, first:
#     python -m training.corpus artifacts/corpus/corpus.tar.xz       # ~27 MB; artifacts/ is not committed
# then run `bash bench/device_build.sh` there with carry ["artifacts/corpus"]. The model and heads
# come back as $OUT/model.tar.part-* (packed as soon as pretraining ends, so a failure in the heads stage
# still returns it) and $OUT/heads.tar; here: cat model.tar.part-* | tar x -C models/; tar xf heads.tar -C models/
# then bench/tune_tree.py, bench/eval_model.py and training/model_card.py on this machine.
# tests/tools/test_build_model.py runs this script on the CPU at a tiny size (the variables below).
set -euo pipefail
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-15}  # a short log in $OUT
python=${PYTHON:-python3}
name=${NAME:-pycoder-14m}
corpus=${CORPUS:-artifacts/corpus/corpus.tar.xz}
device=${DEVICE:-cuda}
work=${WORK:-/tmp/device_build}
minutes=${MINUTES:-3}  # of pretraining; corpus preparation and heads take about 5 more
shape=${SHAPE:---vocab-size 8192 --hidden-size 384 --intermediate-size 1024 --layers 6 --heads 6 --kv-heads 6 \
--batch 64 --lr 3e-3 --eval-every 500}
heads=${HEADS:---sequences 16384 --eval-sequences 512 --seq-len 128 --generate-batch 1024 --steps 3000 --batch 64 \
--lr 3e-3 --warmup 100}
mkdir -p "$work/corpus"
date
tar xJf "$corpus" -C "$work/corpus"
# shellcheck disable=SC2086  # $shape and $heads are lists of flags
"$python" -m training.build_model --sources "$work/corpus" --device "$device" --work "$work/build" \
    --out "$work/$name" --minutes "$minutes" --save-dtype bfloat16 $shape
tar cf - -C "$work" "$name" | split -b 15m - "$OUT/model.tar.part-"
date
# shellcheck disable=SC2086
timeout "${HEADS_SECONDS:-330}" "$python" -m training.train_medusa --model "$work/$name" --out "$work/$name/medusa" \
    --python-sources "$work/corpus" --heads 4 --shared-lm-head --self-distill --device "$device" $heads
date
tar cf "$OUT/heads.tar" -C "$work" "$name/medusa"
ls -l "$OUT"
