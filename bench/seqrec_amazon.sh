#!/usr/bin/env bash
# Issue 4 benchmark on an Amazon-style sequence dataset (default: ../shared/datasets/amazon-toys):
# shards (leave-one-out, item attributes) → train on 2 ranks with +experiment=seqrec_amazon →
# test-split evaluation of the best validation checkpoint → A/B against most-popular.
# usage: bench/seqrec_amazon.sh [DATASET_DIR] [OUT_DIR] [extra training overrides...]
set -euo pipefail
SRC=${1:-../shared/datasets/amazon-toys}
OUT=${2:-bench/out/$(basename "$SRC")}
shift $(( $# < 2 ? $# : 2 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

foundation data build source.format=sasrec_txt source.path="$SRC/sequences.txt" \
    source.item_attributes_path="$SRC/item_attributes.json" split=leave_one_out \
    output="$OUT/shards"
start=$(date +%s)
foundation train --nproc 2 +experiment=seqrec_amazon data.path="$OUT/shards" \
    run_dir="$OUT/run" "$@"
echo "train wall time: $(( $(date +%s) - start )) s" | tee "$OUT/wall_time.txt"
foundation eval run_dir="$OUT/run" split=test checkpoint=best
foundation eval compare "$OUT/run@most_popular" "$OUT/run" --output "$OUT/compare.json"
