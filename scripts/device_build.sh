#!/usr/bin/env bash
# One call of the GPU `device` tool (about 9 minutes on an H100 or H200): a bigger bundled model
# (13.8 M parameters: hidden 384, 6 layers, 8k vocabulary) and its heads, trained on this machine's
# corpus so that the held-out files are the same here and there. Here, first:
#     python -m scripts.corpus artifacts/corpus/corpus.tar.xz       # ~25 MB; artifacts/ is not committed
# then run `bash scripts/device_build.sh` there with carry ["artifacts/corpus"]. The model and heads
# come back as $OUT/model.tar.part-*; here: cat model.tar.part-* | tar x -C models/
# then scripts/tune_tree.py, scripts/eval_model.py and scripts/model_card.py on this machine.
# The same commands at a tiny size run on the CPU in tests/test_build_model.py.
set -euo pipefail
export PYTHONUNBUFFERED=1
name=${NAME:-pycoder-14m}
minutes=${MINUTES:-5}
mkdir -p /tmp/corpus
tar xJf artifacts/corpus/corpus.tar.xz -C /tmp/corpus
python3 -m scripts.build_model --sources /tmp/corpus --device cuda --work /tmp/work --out "/tmp/$name" \
    --vocab-size 8192 --hidden-size 384 --intermediate-size 1024 --layers 6 --heads 6 --kv-heads 6 \
    --batch 64 --lr 3e-3 --eval-every 500 --minutes "$minutes" --save-dtype bfloat16
python3 train_medusa.py --model "/tmp/$name" --out "/tmp/$name/medusa" --python-sources /tmp/corpus \
    --heads 4 --shared-lm-head --self-distill --sequences 16384 --eval-sequences 512 --seq-len 128 \
    --generate-batch 1024 --steps 3000 --batch 64 --lr 3e-3 --warmup 100 --device cuda
tar cf - -C /tmp "$name" | split -b 15m - "$OUT/model.tar.part-"
ls -l "$OUT"
