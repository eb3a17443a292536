#!/usr/bin/env bash
# The framework against a hand-written padded SASRec (../shared/bench/padded_sasrec.py), one
# after the other on the same cores: the preset on 2 ranks with a checkpoint every EVERY
# steps, each checkpoint then evaluated on the test split (the common ruler: the two
# validation sets differ); the reference prints its test numbers each epoch. Prints both test
# curves against training time (evaluation excluded), the ratio of training times to reach
# test HR@10 0.09, the ratio of training events/s (target positions, as the reference counts
# them) and the framework's data-waiting share; writes OUT/speed.json and OUT/speed.png.
# usage: bench/speed.sh [DATASET_DIR] [OUT_DIR] [STEPS] [EVERY] [REFERENCE_MINUTES]
set -euo pipefail
SRC=${1:-../shared/datasets/amazon-toys}
OUT=${2:-bench/out/speed-$(basename "$SRC")}
STEPS=${3:-1500}
EVERY=${4:-150}
MINUTES=${5:-8}
REFERENCE=${REFERENCE:-$(dirname "$0")/../../shared/bench/padded_sasrec.py}
mkdir -p "$OUT"

[ -f "$OUT/shards/manifest.json" ] || foundation data build source.format=sasrec_txt \
    source.path="$SRC/sequences.txt" source.item_attributes_path="$SRC/item_attributes.json" \
    split=leave_one_out output="$OUT/shards"
rm -rf "$OUT/framework"
OMP_NUM_THREADS=1 foundation train --nproc 2 +experiment=seqrec_amazon data.path="$OUT/shards" \
    run_dir="$OUT/framework" trainer.max_steps="$STEPS" trainer.eval_every=0 \
    trainer.patience=0 trainer.checkpoint_every="$EVERY" logger.progress=false
for checkpoint in "$OUT"/framework/checkpoints/step-*; do
    step=${checkpoint##*step-}
    OMP_NUM_THREADS=2 foundation eval run_dir="$OUT/framework" split=test \
        checkpoint="step-$step" > /dev/null
    cp "$OUT/framework/eval.json" "$OUT/framework/eval-test-step-$step.json"
done
OMP_NUM_THREADS=2 python "$REFERENCE" "$SRC/sequences.txt" --minutes "$MINUTES" --dim 64 \
    --layers 1 --heads 1 --dropout 0.2 --bs 256 | tee "$OUT/reference.jsonl"
python "$(dirname "$0")/speed_report.py" "$OUT"
