#!/usr/bin/env bash
# Issue 11 benchmark on a dataset with item text (default: ../shared/datasets/amazon-scientific,
# UniSRec files): shards (the files' own leave-one-out split, item text) → train on 2 ranks
# with +experiment=seqrec_text → test-split evaluation of the best validation checkpoint →
# A/B against most-popular.
# usage: bench/seqrec_text.sh [DATASET_DIR] [OUT_DIR] [extra build overrides
#        (cold_items=0.2 cold_val_items=0.1)]
#        TRAIN="model.item_content=[] model.content_match=false" bench/seqrec_text.sh ...
#        extra training overrides (here: the ID-only ablation)
set -euo pipefail
SRC=${1:-../shared/datasets/amazon-scientific}
OUT=${2:-bench/out/$(basename "$SRC")}
shift $(( $# < 2 ? $# : 2 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

foundation data build source.format=unisrec source.path="$SRC" output="$OUT/shards" "$@"
start=$(date +%s)
# shellcheck disable=SC2086  # TRAIN holds several overrides
foundation train --nproc 2 +experiment=seqrec_text data.path="$OUT/shards" \
    run_dir="$OUT/run" ${TRAIN:-}
echo "train wall time: $(( $(date +%s) - start )) s" | tee "$OUT/wall_time.txt"
foundation eval run_dir="$OUT/run" split=test checkpoint=best
foundation eval compare "$OUT/run@most_popular" "$OUT/run" --output "$OUT/compare.json"
