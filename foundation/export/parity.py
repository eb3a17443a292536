"""``python -m foundation.export.parity BUNDLE PARITY_DIR``: the serving half of the parity gate.

Runs in a fresh process where torchrec, fbgemm and deepspeed cannot be imported, loads the
bundle with each backend, recomputes the member vectors of the histories the sharded model
encoded (``PARITY_DIR/rank*.npz``) and prints one JSON line: per backend the largest score
difference and the share of members whose top-10 is identical; per stored precision the
HR@10 on those members; the ANN index's recall@10 against exact search. A candidate scorer's
bundle is checked the same way on the recorded members' candidates (its logits, and the order
of each member's best 10 candidates).
"""

from __future__ import annotations

import importlib.abc
import json
import sys
from pathlib import Path

from foundation.process import exit_without_teardown

BLOCKED = ("torchrec", "fbgemm_gpu", "deepspeed")


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not available when serving (blocked by the gate)")
        return None


def main(bundle: Path, parity_dir: Path) -> dict:
    sys.meta_path.insert(0, _Blocker())
    return gate(bundle, parity_dir)


def gate(bundle: Path, parity_dir: Path) -> dict:
    """The report: the bundle serving the recorded raw histories, against the model."""
    import numpy as np

    from foundation.choices import BundleKind
    from foundation.export.bundle import load_bundle, read_manifest, top_k

    data = [dict(np.load(p, allow_pickle=False)) for p in sorted(parity_dir.glob("rank*.npz"))]
    kind = read_manifest(bundle).get("kind")
    if kind == BundleKind.candidate_scorer:
        return candidate_gate(bundle, data)
    if kind == BundleKind.search:
        return search_gate(bundle, data)
    report: dict = {"members": int(sum(len(d["lengths"]) for d in data)), "backends": {},
                    "precisions": {}}
    for backend in ("torch", "onnx"):
        predictor = load_bundle(bundle, backend=backend)
        diffs, same = [], []
        for d in data:
            histories = _histories(d)
            events = [predictor._events(h) for h in histories]  # for history exclusion
            scores, reference = predictor.scores_of(events), _reference_scores(predictor, d)
            diffs.append(float(np.abs(scores - reference).max()))
            same.extend((top_k(scores, events, 10) == top_k(reference, events, 10)).all(1).tolist())
        report["backends"][backend] = {"max_abs_diff": max(diffs),
                                       "top10_identical": float(np.mean(same))}
    for precision in predictor.manifest["tables"]["item_vectors"]["precisions"]:
        quantised = load_bundle(bundle, precision=precision) if precision != "fp32" else predictor
        hits = [_hits(quantised, d) for d in data]
        report["precisions"][precision] = {"hr@10": float(np.mean(np.concatenate(hits)))}
    for result in report["precisions"].values():  # the metric change of each stored copy
        result["hr@10_change"] = result["hr@10"] - report["precisions"]["fp32"]["hr@10"]
    if predictor.manifest.get("ann"):
        report["ann"] = _ann_recall(bundle, predictor, data)
    if (parity_dir / "content.npz").exists():
        members = np.concatenate([d["vectors"] for d in data])
        report["towers"] = _tower_parity(bundle, parity_dir / "content.npz", members)
    return report


def candidate_gate(bundle: Path, data: list[dict]) -> dict:
    """A candidate scorer's report: the bundle scoring the recorded members' candidates
    against the trained scorer's logits; ``top10_identical`` is the share of members whose
    best 10 candidates (by the first logit) are the trained scorer's, in its order."""

    from foundation.export.bundle import load_bundle

    report: dict = {"members": int(sum(len(d["lengths"]) for d in data)),
                    "candidates": int(sum(len(d["candidates"]) for d in data)),
                    "backends": {}, "precisions": {}}
    for backend in ("torch", "onnx"):
        scorer = load_bundle(bundle, backend=backend)
        report["backends"][backend] = _candidate_agreement(scorer, data)
    for precision in scorer.manifest["tables"]["item_vectors"]["precisions"]:
        quantised = load_bundle(bundle, precision=precision)
        report["precisions"][precision] = {
            "max_abs_diff": _candidate_agreement(quantised, data)["max_abs_diff"]}
    return report


def search_gate(bundle: Path, data: list[dict]) -> dict:
    """A search model's report: the bundle's query vectors for the recorded searches (query
    text and the member's raw history) scored against the catalogue, against the trained
    model's; per precision the HR@10 of the engaged titles; the ANN index's recall@10."""
    import numpy as np

    from foundation.export.bundle import load_bundle

    report: dict = {"queries": int(sum(len(d["queries"]) for d in data)), "backends": {},
                    "precisions": {}}
    for backend in ("torch", "onnx"):
        searcher = load_bundle(bundle, backend=backend)
        diffs, same = [], []
        for d in data:
            scores = _search_vectors(searcher, d) @ searcher.catalogue.T
            reference = d["vectors"] @ searcher.catalogue.T
            diffs.append(float(np.abs(scores - reference).max()))
            same.extend((_best(scores) == _best(reference)).all(1).tolist())
        report["backends"][backend] = {"max_abs_diff": max(diffs),
                                       "top10_identical": float(np.mean(same))}
    for precision in searcher.manifest["tables"]["search_vectors"]["precisions"]:
        quantised = load_bundle(bundle, precision=precision)
        hits = [(quantised.item_ids[_best(_search_vectors(quantised, d) @ quantised.catalogue.T)]
                 == d["targets"][:, None]).any(1) for d in data]
        report["precisions"][precision] = {"hr@10": float(np.mean(np.concatenate(hits)))}
    for result in report["precisions"].values():
        result["hr@10_change"] = result["hr@10"] - report["precisions"]["fp32"]["hr@10"]
    if searcher.manifest.get("ann"):
        report["ann"] = _ann_recall(bundle, searcher, data)
    return report


def _search_vectors(searcher, d):
    """The served query vectors of the recorded searches (each with its member's history)."""
    import numpy as np

    histories = np.repeat(np.array(_histories(d), dtype=object), d["query_lengths"]).tolist()
    return searcher.query_vectors(d["queries"].tolist(), histories if searcher.personal else None)


def _best(scores, k: int = 10):
    import numpy as np

    scores = scores.copy()
    scores[:, 0] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _candidate_agreement(scorer, data: list[dict]) -> dict:
    import numpy as np

    diffs, same = [], []
    for d in data:
        ends = np.cumsum(d["candidate_lengths"])
        candidates = np.split(d["candidates"], ends[:-1])
        served = scorer.score_candidates_batch(_histories(d), [c.tolist() for c in candidates])
        for got, expected in zip(served, np.split(d["logits"], ends[:-1])):
            diffs.append(float(np.abs(got - expected).max()))
            same.append(_same_top(got[:, 0], expected[:, 0]))
    return {"max_abs_diff": max(diffs), "top10_identical": float(np.mean(same))}


def _same_top(served, trained, k: int = 10, tie: float = 1e-5) -> bool:
    """Whether the served best ``k`` are the trained model's best ``k`` in its order, where
    candidates whose trained logits lie within ``tie`` of each other may come either way
    (a half-trained scorer gives near-equal logits, and float rounding then picks)."""
    import numpy as np

    ranked = trained[np.argsort(-served, kind="stable")]  # trained logits in served order
    top, rest = ranked[:k], ranked[k:]
    in_order = bool((np.diff(top) <= tie).all())
    return in_order and (not len(rest) or bool(top.min() >= rest.max() - tie))


def _reference_scores(predictor, d):
    """The training model's scores: its member vectors against the catalogue, plus its
    history-bias offsets where it has one."""
    import numpy as np

    scores = d["vectors"] @ predictor.catalogue.T
    if "bias_member" in d:
        np.add.at(scores, (d["bias_member"], d["bias_item"]), d["bias_value"])
    return scores


def _tower_parity(bundle: Path, path: Path, members) -> dict:
    """Items embedded as new ones through the bundled towers (both backends), scored for the
    recorded members, against the training model's vectors for the same text."""
    import numpy as np

    from foundation.export.bundle import load_bundle

    saved = dict(np.load(path, allow_pickle=False))
    items = _new_items(saved)
    reference = members @ saved["vectors"].T  # the model's scoring vectors of these items
    diffs = {}
    for backend in ("torch", "onnx"):
        predictor = load_bundle(bundle, backend=backend)
        served = predictor._scoring(*predictor.new_item_vectors(items), seen=False)
        diffs[backend] = float(np.abs(members @ served.T - reference).max())
    return {"items": len(items), "members": len(members), "max_abs_diff": diffs}


def _new_items(saved: dict) -> dict:
    """The recorded items' raw content as a caller would pass it to ``add_items``."""
    import numpy as np

    items: dict = {int(i): {} for i in saved["raw_ids"]}
    rows = list(items.values())
    if "texts" in saved:
        for row, text in zip(rows, saved["texts"]):
            row["text"] = str(text)
    if "image_pixels" in saved:
        ends = np.cumsum([int(np.prod(s)) for s in saved["image_shapes"]])
        for row, pixels, shape in zip(rows, np.split(saved["image_pixels"], ends[:-1]),
                                      saved["image_shapes"]):
            row["image"] = pixels.reshape(shape)
    if "audio_samples" in saved:
        ends = np.cumsum(saved["audio_lengths"])
        for row, samples, rate in zip(rows, np.split(saved["audio_samples"], ends[:-1]),
                                      saved["audio_rates"]):
            row["audio"] = (samples, int(rate))
    if "item_vectors" in saved:
        for row, vector in zip(rows, saved["item_vectors"]):
            row["vectors"] = vector
    return items


def _histories(d) -> list:
    """The recorded histories as a caller would pass them: ``History`` objects."""
    from foundation.export.bundle import History

    starts = d["lengths"].cumsum() - d["lengths"]
    features = {k.removeprefix("event_"): v for k, v in d.items() if k.startswith("event_")}
    return [History(items=d["item"][s:s + n].tolist(), timestamps=d["timestamp"][s:s + n].tolist(),
                    **{name: v[s:s + n].tolist() for name, v in features.items()})
            for s, n in zip(starts, d["lengths"])]


def _hits(predictor, d):
    from foundation.export.bundle import top_k

    histories = _histories(d)
    events = [predictor._events(h) for h in histories]
    top = top_k(predictor.scores_of(events), events, 10)
    return (top == d["targets"][:, None]).any(1)


def _ann_recall(bundle: Path, predictor, data, k: int = 10) -> dict:
    import faiss
    import numpy as np

    index = faiss.read_index(str(bundle / predictor.manifest["ann"]["file"]))
    index.hnsw.efSearch = predictor.manifest["ann"]["ef_search"]
    queries = np.concatenate([d["vectors"] for d in data]).astype(np.float32)
    _, found = index.search(queries, k)
    exact = np.argsort(-(queries @ predictor.catalogue[1:].T), axis=1)[:, :k]
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact)])
    return {f"recall@{k}": float(recall), "queries": len(queries)}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
    exit_without_teardown(0)
