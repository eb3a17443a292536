"""Serving bundles: what ``foundation export`` writes, and the reference predictor that serves
one with torch *or* onnxruntime alone (no torchrec, fbgemm or deepspeed: this module imports
numpy and safetensors, and the chosen backend only when a predictor is built).

Layout (docs/serving.md)::

    BUNDLE/manifest.json                    schema, vocabularies, provenance, metrics, sha256s
    BUNDLE/model.pt2                        member encoder: torch.export, dynamic batch × length
    BUNDLE/model.onnx                       the same program in ONNX
    BUNDLE/embeddings/<table>.safetensors   every table, fp32 (+ .fp16 / .int8 row-wise)
    BUNDLE/embeddings/item_vectors*.safetensors  the scoring catalogue (table + side features)
    BUNDLE/ann/items.faiss                  optional approximate-nearest-neighbour index

A candidate scorer's bundle (``kind: candidate_scorer``: ranking, messaging) has the same
layout without the ANN index: its program scores the candidates a caller gives (their
vectors, and with content their unit content vectors, ``embeddings/content_units``). A search
bundle's (``kind: search``) program is the query tower (query n-grams, and the member's
events) and ``embeddings/search_vectors`` what it scores (and the ANN index indexes).

Nothing here unpickles: tables are safetensors, the manifest is JSON, and ``model.pt2`` is
refused if any of its entries is a pickle (``torch.export.load`` would fall back to
``weights_only=False`` on one).
"""

from __future__ import annotations

import difflib
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from foundation.checksum import sha256
from foundation.choices import BundleKind
from foundation.data.media import decode_audio, decode_image, prepare_audio, prepare_image
from foundation.data.schema import EventSchema
from foundation.data.text import hashed_ngrams

MANIFEST = "manifest.json"
BUNDLE_FORMAT = 1
PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = {"torch": "model.pt2", "onnx": "model.onnx"}
TEXT_BATCH = 64  # texts per run of a bundled text tower
# What the parity gate records of each history besides its stored event features (saved as
# ``event_<name>``): the raw events a caller would pass.
PARITY_FIELDS = ("item", "timestamp", "lengths")


class BundleError(RuntimeError):
    """A bundle that cannot be served: the message names the file and what is wrong."""


def table_file(name: str, precision: str = "fp32") -> str:
    suffix = "" if precision == "fp32" else f".{precision}"
    return f"embeddings/{name}{suffix}.safetensors"


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} not found: not an export bundle (write one with "
                          f"`foundation export run_dir=RUN output={root}`)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: bundle format {manifest.get('format')!r}, this reader "
                          f"understands {BUNDLE_FORMAT}; re-export with this version")
    return manifest


def verify(root: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists, stays inside the bundle and has its sha256."""
    for name, expected in manifest["files"].items():
        path = (root / name).resolve()
        if root.resolve() not in path.parents:
            raise BundleError(f"manifest lists {name!r}, outside the bundle: refusing it")
        if not path.is_file():
            raise BundleError(f"{root / name} is missing (listed in the manifest)")
        if sha256(path) != expected:
            raise BundleError(f"{root / name} does not match its sha256 in the manifest: the "
                              f"file was changed or corrupted after export; re-export the bundle")


def quantise_rows(weight: np.ndarray, precision: str) -> dict[str, np.ndarray]:
    """A table as stored: fp32, fp16, or int8 row-wise (``scale``/``offset`` per row)."""
    if precision == "fp32":
        return {"weight": weight.astype(np.float32)}
    if precision == "fp16":
        return {"weight": weight.astype(np.float16)}
    low, high = weight.min(1, keepdims=True), weight.max(1, keepdims=True)
    scale = np.maximum(high - low, 1e-12) / 255.0
    codes = np.round((weight - low) / scale) - 128
    return {"weight": codes.astype(np.int8), "scale": scale.astype(np.float32),
            "offset": low.astype(np.float32)}


def dequantise_rows(stored: dict[str, np.ndarray]) -> np.ndarray:
    weight = stored["weight"]
    if weight.dtype == np.int8:
        return (weight.astype(np.float32) + 128) * stored["scale"] + stored["offset"]
    return weight.astype(np.float32)


class History:
    """One member's events, oldest first, as the caller knows them (pass the whole history:
    the newest ``max_len`` events are read, the time gap of the oldest of those comes from
    the one before it). ``items`` are catalogue ids (as in the source data); ``timestamps``
    unix seconds (default: none, which the model sees as events with no time information);
    each categorical event feature of the bundle (``manifest.features``, e.g. ``action``,
    ``device``) by its name, as names or ids, one per event (default: the feature's
    ``default``)."""

    def __init__(self, items: Sequence[int], timestamps: Sequence[int] | None = None,
                 **features: Sequence[str | int]):
        self.items, self.timestamps, self.features = items, timestamps, features

    def __repr__(self) -> str:
        extra = "".join(f", {k}={list(v)!r}" for k, v in self.features.items())
        return f"History(items={list(self.items)!r}, timestamps={self.timestamps!r}{extra})"


def load_bundle(path: str | Path, backend: str = "torch", precision: str = "fp32"
                ) -> Predictor | CandidateScorer | SearchPredictor:
    """Verify a bundle's checksums and return what serves it (``backend``: torch | onnx): a
    ``Predictor`` for a member model, a ``CandidateScorer`` for a candidate scorer, a
    ``SearchPredictor`` for a search model."""
    root = Path(path)
    kind = read_manifest(root).get("kind", BundleKind.member_model)
    readers = {BundleKind.member_model: Predictor, BundleKind.candidate_scorer: CandidateScorer,
               BundleKind.search: SearchPredictor}
    if kind not in readers:
        raise BundleError(f"{root}: a {kind!r} bundle, which this version cannot serve "
                          f"(it serves {[str(k) for k in readers]})")
    return readers[kind](root, backend=backend, precision=precision)


class BundleReader:
    """What every bundle serves from: its verified manifest, the item vectors and feature
    tables that make event tokens, and its programs with the chosen backend."""

    kind: BundleKind

    def __init__(self, root: Path, backend: str = "torch", precision: str = "fp32"):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: choose from {list(BACKENDS)}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: choose from {list(PRECISIONS)}")
        self.root, self.backend = root, backend
        self.manifest = read_manifest(root)
        kind = self.manifest.get("kind", BundleKind.member_model)
        if kind != self.kind:
            raise BundleError(f"{root} holds a {kind} bundle, not a {self.kind}: open it with "
                              f"load_bundle(), which picks the reader")
        verify(root, self.manifest)
        model = self.manifest["model"]
        self.max_len, self.token_features = model["max_len"], model["token_features"]
        self.schema = EventSchema.from_manifest(self.manifest)
        self.item_scale = float(model.get("item_scale", 1.0))
        self.uses_time = "timestamps" in self.manifest["inputs"]
        self.token_vectors = self._table("item_vectors", precision)
        self.item_ids = load_file(root / table_file("item_ids"))["ids"]
        self._internal = {int(raw): i for i, raw in enumerate(self.item_ids) if i > 0}
        self.tables = {key: self._table(f"{key}_table") for key in self.token_features
                       if key != "item"}
        self._run = self._load_program(root / BACKENDS[backend])
        self._towers: dict[str, Any] = {}
        self._text_tokenizer = None  # loaded on the first text through the bundled tower

    def _table(self, name: str, precision: str = "fp32") -> np.ndarray:
        available = self.manifest["tables"].get(name, {}).get("precisions", [])
        if precision not in available:
            raise BundleError(f"{self.root}: table {name!r} has no {precision} copy "
                              f"(exported: {available}); re-export with that precision")
        return dequantise_rows(load_file(self.root / table_file(name, precision)))

    def _program(self, stem: str):
        """A bundled program (``STEM.pt2`` or ``STEM.onnx``, by backend), loaded once."""
        if stem not in self._towers:
            suffix = Path(BACKENDS[self.backend]).suffix
            self._towers[stem] = self._load_program(self.root / f"{stem}{suffix}")
        return self._towers[stem]

    def _load_program(self, path: Path):
        if self.backend == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            names = [i.name for i in session.get_inputs()]
            return lambda *inputs: session.run(None, dict(zip(names, inputs)))[0]
        import torch

        refuse_pickled_entries(path)
        program = torch.export.load(str(path)).module()

        def run(*inputs: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return program(*map(torch.from_numpy, inputs)).numpy()
        return run

    def _text_vectors(self, spec: dict[str, Any], texts: Sequence[Any]) -> np.ndarray:
        """Texts → the bundled text tower's vectors (``spec``: the manifest's tower entry)."""
        from tokenizers import Tokenizer

        if self._text_tokenizer is None:
            self._text_tokenizer = Tokenizer.from_file(str(self.root / spec["tokenizer"]))
        tower, out = self._program(spec["program"]), []
        for start in range(0, len(texts), TEXT_BATCH):
            encoded = self._text_tokenizer.encode_batch([str(t) for t in
                                                         texts[start:start + TEXT_BATCH]])
            out.append(np.asarray(tower(np.array([e.ids for e in encoded], dtype=np.int64),
                                        np.array([e.attention_mask for e in encoded],
                                                 dtype=np.int64)), dtype=np.float32))
        return np.concatenate(out)

    def _known(self, items: Sequence[int], what: str) -> np.ndarray:
        unknown = [i for i in items if int(i) not in self._internal]
        if unknown:
            raise ValueError(f"{what}: unknown catalogue id(s) {unknown[:5]} (not in the "
                             f"bundle's {len(self._internal)} items)")
        return np.array([self._internal[int(i)] for i in items], dtype=np.int64)

    def _events(self, history: History | Sequence[int]) -> dict[str, np.ndarray]:
        """A history as the model's event ids (the schema's, computed as the loader computes
        them), cut to its newest ``max_len`` events."""
        h = history if isinstance(history, History) else History(items=list(history))
        if len(h.items) == 0:
            raise ValueError("empty history: the member model needs at least one event")
        self._check_features(h)
        n = len(h.items)
        ts = np.asarray(h.timestamps if h.timestamps is not None else [0] * n, dtype=np.int64)
        if len(ts) != n:
            raise ValueError(f"history lengths differ: {n} items, {len(ts)} timestamps")
        stored = {name: self.schema.encode(name, h.features.get(name), n)
                  for name in self.schema.stored}
        keep = slice(max(0, n - self.max_len), None)  # gaps from the whole history first
        return {"item": self._known(h.items, "history")[keep], "timestamp": ts[keep],
                **self.schema.event_ids(stored, ts, keep)}

    def _check_features(self, history: History) -> None:
        served = self.schema.stored
        for name in history.features:
            if name not in served:
                close = difflib.get_close_matches(name, served, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"History feature {name!r} is not one this bundle serves"
                                 f"{hint}; its event features: {list(served)}")

    def _token_inputs(self, events: Sequence[dict[str, np.ndarray]]
                      ) -> tuple[np.ndarray, ...]:
        """Event ids (one dict of equal-length arrays per member) → the programs' history
        inputs: tokens ``[B, L, D]`` (left-aligned), lengths and, if read, timestamps."""
        lengths = np.array([len(e["item"]) for e in events], dtype=np.int64)
        dim = self.token_vectors.shape[1]
        tokens = np.zeros((len(events), int(lengths.max()), dim), dtype=np.float32)
        times = np.zeros(tokens.shape[:2], dtype=np.int64)
        for row, e in enumerate(events):
            token = self.token_vectors[e["item"]] * np.float32(self.item_scale)
            for key, table in self.tables.items():
                token += table[e[key]]
            tokens[row, : len(token)] = token
            if self.uses_time:
                times[row, : len(token)] = e["timestamp"]
        return (tokens, lengths, times) if self.uses_time else (tokens, lengths)


class Predictor(BundleReader):
    """Serves a member-model bundle: ``recommend`` (top-K of the catalogue) and ``score``."""

    kind = BundleKind.member_model

    def __init__(self, root: Path, backend: str = "torch", precision: str = "fp32"):
        super().__init__(root, backend, precision)
        self.cosine = self.manifest["model"].get("similarity", "dot") == "cosine"
        match = (self.manifest.get("content") or {}).get("match")
        # content_match (models/content.py ContentMatch): each item's content units, scored
        # against the history's recency-weighted units
        self.match = load_file(root / match["file"]) if match else None
        self.units = self.match["units"] if match else None
        self.catalogue = self._scoring(self.token_vectors, self.units,
                                       self.match["seen"].astype(bool) if match else None)
        bias = self.manifest.get("history_bias")  # models/history.py HistoryBias
        self.history_bias = load_file(root / bias["file"])["weight"] if bias else None
        self.exported_items = len(self.catalogue)  # rows after these came from add_items

    # -- public API ---------------------------------------------------------------------
    def recommend(self, history: History | Sequence[int], k: int = 10,
                  exclude_seen: bool = True) -> list[int]:
        """The top-``k`` catalogue ids for one member, best first."""
        return self.recommend_batch([history], k, exclude_seen)[0]

    def recommend_batch(self, histories: Sequence[History | Sequence[int]], k: int = 10,
                        exclude_seen: bool = True) -> list[list[int]]:
        events = [self._events(h) for h in histories]
        top = top_k(self.scores_of(events), events, k, exclude_seen)
        return [[int(self.item_ids[i]) for i in row] for row in top]

    def score(self, history: History | Sequence[int], candidates: Sequence[int]) -> np.ndarray:
        """Scores of ``candidates`` (catalogue ids) for one member; higher is better."""
        return self.scores_of([self._events(history)])[0, self._known(candidates, "candidates")]

    def member_vectors(self, histories: Sequence[History | Sequence[int]]) -> np.ndarray:
        """Members' embeddings ``[B, D]`` (for an embedding store or the ANN index; with
        content match, their content queries follow: ``[B, D + C]``, as the catalogue's)."""
        return self.member_vectors_of([self._events(h) for h in histories])

    def add_items(self, items: dict[int, dict[str, Any]]) -> None:
        """New titles, by catalogue id: ``{id: {"text": "...", "vectors": [...]}}`` (the
        modalities the model reads). Each is embedded with the bundled towers as the model
        embeds an item it has no ID row for, joins the scoring catalogue at once
        (``recommend`` and ``score`` can return it) and the ANN index (``ann_index``)."""
        clash = [i for i in items if int(i) in self._internal]
        if clash:
            raise ValueError(f"add_items: {clash[:5]} already in the catalogue")
        vectors, units = self.new_item_vectors(items)
        start = len(self.catalogue)
        self.token_vectors = np.vstack([self.token_vectors, vectors])
        self.catalogue = np.vstack([self.catalogue, self._scoring(vectors, units, False)])
        if self.units is not None:
            self.units = np.vstack([self.units, units])
        self.item_ids = np.concatenate([self.item_ids, np.array(list(items), dtype=np.int64)])
        self._internal.update({int(i): start + k for k, i in enumerate(items)})

    def _scoring(self, vectors: np.ndarray, units: np.ndarray | None = None,
                 seen: np.ndarray | bool = True) -> np.ndarray:
        """Items' scoring vectors from their input vectors (unit length under cosine) and,
        with content match, their content units (weighted by whether the item was seen in
        training)."""
        if self.cosine:
            vectors = unit_rows(vectors)
        if self.match is None:
            return vectors
        weight = self.match["item_weight"][np.asarray(seen, dtype=np.int64)]
        return np.hstack([vectors, units * np.broadcast_to(weight, len(units))[:, None]])

    def new_item_vectors(self, items: dict[int, dict[str, Any]]
                         ) -> tuple[np.ndarray, np.ndarray | None]:
        """Items described by their content only: their vectors ``[N, D]`` as event inputs,
        and with content match their content units (``_scoring`` makes both a score's)."""
        content = self.manifest.get("content")
        if not content:
            raise BundleError(f"{self.root} holds an ID-only model: it cannot embed new items "
                              f"(train with model.item_content=[text] and export again)")
        modalities = content["modalities"]
        fallback = load_file(self.root / content["fallback"])["weight"]
        out = np.repeat(fallback[None].astype(np.float32), len(items), axis=0)
        for item, given in items.items():
            unknown = sorted(set(given) - set(modalities))
            if unknown or not given:
                raise ValueError(f"add_items: item {item} gives {sorted(given)}; this model "
                                 f"reads {sorted(modalities)}")
        units = []
        for name, spec in modalities.items():
            rows = [row for row, given in enumerate(items.values()) if name in given]
            raw = self._encode(name, spec, [list(items.values())[row][name] for row in rows]
                               ) if rows else np.zeros((0, spec["dim"]), np.float32)
            adapter = load_file(self.root / spec["adapter"])
            out[rows] += (raw - adapter["center"]) @ adapter["project"].T
            if self.match is not None:
                if rows and "match_program" in spec:  # a tuned tower: match reads the frozen
                    raw = self._encode(name, {**spec, "program": spec["match_program"]},
                                       [list(items.values())[row][name] for row in rows])
                unit = np.zeros((len(items), spec["dim"]), np.float32)
                unit[rows] = unit_rows(raw - self.match[f"center_{name}"])
                units.append(unit)
        if self.match is None:
            return out, None
        return out, np.hstack(units) / np.float32(np.sqrt(len(units)))

    def _encode(self, name: str, spec: dict[str, Any], values: list[Any]) -> np.ndarray:
        """One modality's raw content → its tower's vectors ``[N, dim]``: text as strings,
        images as paths, bytes or uint8 ``[H, W, 3]`` arrays, audio as paths, bytes or
        ``(samples, rate)``, vectors as arrays."""
        if name == "vectors":
            vectors = np.asarray(values, dtype=np.float32).reshape(len(values), -1)
            if vectors.shape[1] != spec["dim"]:
                raise ValueError(f"add_items: {name} of {vectors.shape[1]} values, the model "
                                 f"reads {spec['dim']}")
            return vectors
        if name == "text":
            return self._text_vectors(spec, values)
        tower = self._program(spec["program"])
        out = []
        for start in range(0, len(values), 64):
            chunk = values[start:start + 64]
            if name == "image":
                inputs = (np.stack([prepare_image(_image(v), spec["size"]) for v in chunk]),)
            else:
                inputs = (np.stack([prepare_audio(*_clip(v), spec["sample_rate"], spec["length"])
                                    for v in chunk]),)
            out.append(np.asarray(tower(*inputs), dtype=np.float32))
        return np.concatenate(out)

    def ann_index(self):
        """The bundle's faiss index, with the items added since loading (id = row - 1)."""
        import faiss

        if not self.manifest.get("ann"):
            raise BundleError(f"{self.root} was exported without an ANN index (ann=false)")
        index = faiss.read_index(str(self.root / self.manifest["ann"]["file"]))
        index.hnsw.efSearch = self.manifest["ann"]["ef_search"]
        index.add(np.ascontiguousarray(self.catalogue[self.exported_items:]))
        return index

    # -- internals ----------------------------------------------------------------------
    def member_vectors_of(self, events: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
        """Event ids (one dict of equal-length arrays per member) → member embeddings."""
        members = np.asarray(self._run(*self._token_inputs(events)), dtype=np.float32)
        return members if self.match is None else np.hstack([members, self._queries(events)])

    def scores_of(self, events: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
        """Every catalogue row's score ``[B, rows]`` for each member: the dot product and, with
        a history bias, its offset for each of the member's events."""
        scores = self.member_vectors_of(events) @ self.catalogue.T
        if self.history_bias is not None:
            for row, e in enumerate(events):
                ages = np.arange(len(e["item"]))[::-1].clip(max=len(self.history_bias) - 1)
                np.add.at(scores[row], e["item"], self.history_bias[ages])
        return scores

    def _queries(self, events: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
        """Members' content-match queries: their newest events' units, recency-weighted."""
        recency = self.match["recency"]
        return np.stack([recency[np.arange(len(e["item"]))[::-1]] @ self.units[e["item"]]
                         for e in events])


class CandidateScorer(BundleReader):
    """Serves a candidate-scorer bundle (ranking, messaging): the logits of the candidates a
    caller gives for a member (``manifest.outputs.logits``: their columns and meaning)."""

    kind = BundleKind.candidate_scorer

    def __init__(self, root: Path, backend: str = "torch", precision: str = "fp32"):
        super().__init__(root, backend, precision)
        self.outputs = self.manifest["outputs"]["logits"]["columns"]
        # Each item's unit content vectors, where the scorer reads content closeness.
        self.units = (self._table("content_units") if "history_units" in self.manifest["inputs"]
                      else None)

    def score_candidates(self, history: History | Sequence[int], candidates: Sequence[int]
                         ) -> np.ndarray:
        """``[len(candidates), len(outputs)]`` logits of ``candidates`` (catalogue ids)."""
        return self.score_candidates_batch([history], [candidates])[0]

    def score_candidates_batch(self, histories: Sequence[History | Sequence[int]],
                               candidates: Sequence[Sequence[int]]) -> list[np.ndarray]:
        if len(histories) != len(candidates):
            raise ValueError(f"{len(histories)} histories but {len(candidates)} candidate lists")
        rows = [self._known(c, "candidates") for c in candidates]
        return self.logits_of([self._events(h) for h in histories], rows)

    def logits_of(self, events: Sequence[dict[str, np.ndarray]], rows: Sequence[np.ndarray]
                  ) -> list[np.ndarray]:
        """Event ids per member and their candidates' catalogue rows → each member's
        ``[candidates, outputs]`` logits."""
        if any(len(r) == 0 for r in rows):
            raise ValueError("every member needs at least one candidate to score")
        wide = max(len(r) for r in rows)
        placed = np.zeros((len(rows), wide), dtype=np.int64)  # padding scores row 0, unread
        for member, r in enumerate(rows):
            placed[member, :len(r)] = r
        inputs = [*self._token_inputs(events), self.token_vectors[placed]]
        if self.units is not None:
            history = np.zeros((len(events), int(inputs[1].max()), self.units.shape[1]),
                               dtype=np.float32)
            for member, e in enumerate(events):
                history[member, :len(e["item"])] = self.units[e["item"]]
            inputs += [history, self.units[placed]]
        logits = np.asarray(self._run(*inputs), dtype=np.float32)
        return [logits[member, :len(r)] for member, r in enumerate(rows)]


class SearchPredictor(BundleReader):
    """Serves a search bundle: a query (and, for a personalised model, the member who typed
    it) → the best catalogue titles, by one dot product with ``search_vectors``."""

    kind = BundleKind.search

    def __init__(self, root: Path, backend: str = "torch", precision: str = "fp32"):
        super().__init__(root, backend, precision)
        self.catalogue = self._table("search_vectors", precision)
        self.buckets = int(self.manifest["query"]["ngram_buckets"])
        self.personal = bool(self.manifest["query"]["member_state"])
        self.text_tower = self.manifest["query"].get("text_tower")  # None: n-grams only

    def search(self, query: str, history: History | Sequence[int] | None = None,
               k: int = 10) -> list[int]:
        """The top-``k`` catalogue ids for ``query``, best first (``history``: the searching
        member's, required by a personalised model)."""
        return self.search_batch([query], None if history is None else [history], k)[0]

    def search_batch(self, queries: Sequence[str],
                     histories: Sequence[History | Sequence[int]] | None = None,
                     k: int = 10) -> list[list[int]]:
        scores = self.query_vectors(queries, histories) @ self.catalogue.T
        scores[:, 0] = -np.inf  # the padding row
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[int(self.item_ids[i]) for i in row] for row in top]

    def query_vectors(self, queries: Sequence[str],
                      histories: Sequence[History | Sequence[int]] | None = None) -> np.ndarray:
        """Each query's scoring vector ``[Q, ·]`` (one history per query when personalised)."""
        if self.personal and histories is None:
            raise ValueError("this search model reads the searching member: pass one history "
                             "per query")
        if histories is not None and len(histories) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(histories)} histories")
        events = [self._events(h) for h in histories] if self.personal else []
        return self.query_vectors_of(queries, events)

    def query_vectors_of(self, queries: Sequence[str],
                         events: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
        texts = [str(q) for q in queries]
        inputs = [hashed_ngrams(texts, self.buckets)]
        if self.text_tower is not None:
            inputs.append(self._text_vectors(self.text_tower, texts))
        if self.personal:
            inputs += self._token_inputs(events)
        return np.asarray(self._run(*inputs), dtype=np.float32)


def _media_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes | bytearray) else Path(value).read_bytes()


def _image(value: Any) -> np.ndarray:
    """An image given as a path, encoded bytes or a uint8 ``[H, W, 3]`` array."""
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3:
            raise ValueError(f"add_items: an image array must be uint8 [H, W, 3], got "
                             f"{value.dtype} {value.shape}")
        return value
    return decode_image(_media_bytes(value))


def _clip(value: Any) -> tuple[np.ndarray, int]:
    """Audio given as a path, encoded bytes or ``(samples, rate)``."""
    if isinstance(value, tuple):
        return np.asarray(value[0], dtype=np.float32), int(value[1])
    return decode_audio(_media_bytes(value))


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def top_k(scores: np.ndarray, events: Sequence[dict[str, np.ndarray]], k: int,
          exclude_seen: bool = True) -> np.ndarray:
    """Row ids of each member's ``k`` best items, never padding and (``exclude_seen``) never
    an item of their history."""
    scores = scores.copy()
    scores[:, 0] = -np.inf
    if exclude_seen:
        for row, e in enumerate(events):
            scores[row, e["item"]] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def refuse_pickled_entries(path: Path) -> None:
    """``torch.export.load`` unpickles (falling back to ``weights_only=False``) any tensor or
    sample input stored as a pickle: refuse an archive holding one before it is read."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name = info.filename
            if name.endswith("_config.json"):
                config = json.loads(archive.read(name)).get("config", {})
                pickled = [k for k, v in config.items() if v.get("use_pickle")]
                if pickled:
                    raise BundleError(f"{path} stores {pickled[:3]} as pickles: refusing to "
                                      f"load it (pickles can run code)")
            elif name.endswith((".pt", ".pkl", ".pickle")) and info.file_size > 0:
                raise BundleError(f"{path} holds a pickle ({name}): refusing to load it "
                                  f"(pickles can run code); re-export the bundle")
