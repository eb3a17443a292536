"""Exporting a search model: its query tower, the queries the parity gate serves, and the
manifest's description of both (docs/serving.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from foundation.eval.run import TrainedRun
from foundation.export.content import write_text_tower
from foundation.export.programs import ProgramInput, export_inputs, history_inputs
from foundation.export.recorded import caller_history, raw_ids, save_rank, whole_histories
from foundation.models.member import sparse_features
from foundation.recipes.finetune_search import SearchQueryProgram
from foundation.tasks import keep_last


def write_search_program(run: TrainedRun, root: Path) -> dict[str, Any]:
    """``model.pt2`` / ``model.onnx`` of the query tower, dynamic in queries, n-grams and
    history length; returns the manifest's ``inputs`` and ``outputs``."""
    program = SearchQueryProgram(run.model.dense_module).eval()
    dim = run.cfg.model.embedding_dim
    queries = torch.export.Dim("queries", min=1, max=1 << 20)
    grams = torch.export.Dim("grams", min=1, max=1 << 12)
    inputs = history_inputs(dim, run.cfg.model.max_len, queries)  # the searching member's
    inputs["query_grams"] = ProgramInput(torch.randint(0, 100, (3, 5)), {0: queries, 1: grams}, {
        "dtype": "int64", "shape": ["queries", "grams"],
        "meaning": "the query's n-gram rows (manifest.query), padded with 0"})
    if run.task.query_texts is not None:
        width = run.task.query_texts.tower.out_dim
        inputs["query_text"] = ProgramInput(torch.randn(3, width), {0: queries}, {
            "dtype": "float32", "shape": ["queries", width],
            "meaning": "the query text's vector by the text tower (manifest.query.text_tower)"})
    width = dim * (2 if "tokens" in program.input_names else 1)
    return {"inputs": export_inputs(program, inputs, root / "model", "query"),
            "outputs": {"query": {"dtype": "float32", "shape": ["queries", width],
                                  "meaning": "score = query · search_vectors[item]"}}}


def search_query_manifest(run: TrainedRun, root: Path) -> dict[str, Any]:
    """How a query's text becomes the program's inputs; with the text tower, writes it."""
    query = {"ngram_buckets": run.task.recipe.ngram_buckets,
             "member_state": bool(run.task.recipe.member_state),
             "grams": "each lower-cased word [a-z0-9]+ as 'w:<word>' and the character trigrams "
                      "of '<word>', row = 1 + crc32(utf-8) % (ngram_buckets - 1) "
                      "(foundation.data.text.hashed_ngrams)"}
    if run.task.query_texts is not None:
        query["text_tower"] = write_text_tower(run.cfg.model, root, None)
    return query


def write_search_parity_inputs(run: TrainedRun, root: Path, cfg) -> None:
    """Each rank's evaluation searches as a caller holds them (query text, the searching
    member's whole history) and the trained model's query vectors for them."""
    parts: dict[str, list[np.ndarray]] = {}
    ids = raw_ids(run)
    for batch, real in whole_histories(run, cfg, run.task.data_mode):
        served = keep_last(batch, run.cfg.model.max_len)
        with torch.no_grad():
            vectors = run.model.dense(served, run.model.embed(sparse_features(served)),
                                      mode="queries", **run.task.query_inputs(served.queries))
        if real:
            for key, value in {**caller_history(run, batch, ids),
                               "queries": np.array(batch.queries, dtype=str),
                               "query_lengths": batch.query_lengths.numpy(),
                               "targets": ids[batch.query_items.numpy()],
                               "vectors": vectors.numpy()}.items():
                parts.setdefault(key, []).append(value)
    save_rank(root, run, parts)
