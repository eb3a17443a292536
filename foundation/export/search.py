"""Exporting a search model: its query tower, the queries the parity gate serves, and the
manifest's description of both (docs/serving.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from foundation.eval.run import TrainedRun
from foundation.export.programs import export_program
from foundation.export.recorded import caller_history, raw_ids, save_rank, whole_histories
from foundation.models.member import sparse_features
from foundation.recipes.finetune_search import SearchQueryProgram, ngram_rows
from foundation.tasks import keep_last


def write_search_program(run: TrainedRun, root: Path) -> dict[str, Any]:
    """``model.pt2`` / ``model.onnx`` of the query tower, dynamic in queries, n-grams and
    history length; returns the manifest's ``inputs`` and ``outputs``."""
    program = SearchQueryProgram(run.model.dense_module).eval()
    dim, max_len = run.cfg.model.embedding_dim, run.cfg.model.max_len
    longest = min(4, max_len)
    queries = torch.export.Dim("queries", min=1, max=1 << 20)
    grams = torch.export.Dim("grams", min=1, max=1 << 12)
    seq = torch.export.Dim("seq", min=1, max=max_len)
    examples = {"query_grams": (torch.randint(0, 100, (3, 5)), {0: queries, 1: grams}),
                "tokens": (torch.randn(3, longest, dim), {0: queries, 1: seq}),
                "lengths": (torch.tensor([longest, 2, 1]), {0: queries}),
                "timestamps": (torch.randint(0, 1 << 31, (3, longest)), {0: queries, 1: seq})}
    inputs = tuple(examples[name][0] for name in program.input_names)
    shapes = (tuple(examples[name][1] for name in program.input_names),)  # one *inputs
    export_program(program, inputs, shapes, root / "model", output_name="query")
    width = dim * (2 if "tokens" in program.input_names else 1)
    described = {
        "query_grams": {"dtype": "int64", "shape": ["queries", "grams"],
                        "meaning": "the query's n-gram rows (manifest.query), padded with 0"},
        "tokens": {"dtype": "float32", "shape": ["queries", "seq", dim],
                   "meaning": "the searching member's events, per event: item_scale · "
                              "item_vectors[item] + sum of <feature>_table[id] over "
                              "token_features[1:]"},
        "lengths": {"dtype": "int64", "shape": ["queries"],
                    "meaning": "events per row; rows are left-aligned"},
        "timestamps": {"dtype": "int64", "shape": ["queries", "seq"],
                       "meaning": "each event's unix seconds"}}
    return {"inputs": {name: described[name] for name in program.input_names},
            "outputs": {"query": {"dtype": "float32", "shape": ["queries", width],
                                  "meaning": "score = query · search_vectors[item]"}}}


def search_query_manifest(run: TrainedRun) -> dict[str, Any]:
    return {"ngram_buckets": run.task.recipe.ngram_buckets,
            "member_state": bool(run.task.recipe.member_state),
            "grams": "each lower-cased word [a-z0-9]+ as 'w:<word>' and the character trigrams "
                     "of '<word>', row = 1 + crc32(utf-8) % (ngram_buckets - 1) "
                     "(foundation.data.text.hashed_ngrams)"}


def write_search_parity_inputs(run: TrainedRun, root: Path, cfg) -> None:
    """Each rank's evaluation searches as a caller holds them (query text, the searching
    member's whole history) and the trained model's query vectors for them."""
    parts: dict[str, list[np.ndarray]] = {}
    ids = raw_ids(run)
    buckets = run.task.recipe.ngram_buckets
    for batch, real in whole_histories(run, cfg, run.task.data_mode):
        served = keep_last(batch, run.cfg.model.max_len)
        with torch.no_grad():
            vectors = run.model.dense(served, run.model.embed(sparse_features(served)),
                                      ngram_rows(served.queries, buckets), mode="queries")
        if real:
            for key, value in {**caller_history(run, batch, ids),
                               "queries": np.array(batch.queries, dtype=str),
                               "query_lengths": batch.query_lengths.numpy(),
                               "targets": ids[batch.query_items.numpy()],
                               "vectors": vectors.numpy()}.items():
                parts.setdefault(key, []).append(value)
    save_rank(root, run, parts)
