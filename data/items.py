"""Item content: sources (text TSV, upstream vectors, media files, UniSRec text) → item
shards → readers.

Item shards sit beside the event shards, under the same rules: plain webdataset tars, one
sample per item (``meta.json`` with the contiguous and raw item id, ``txt`` with UTF-8 text,
``vec.npy`` with a float32 vector, ``jpg``/``png`` an image, ``wav``/``flac`` an audio clip,
as the original bytes), no pickle anywhere, media decoded within limits (data/media.py),
listed in ``manifest.json`` with their sample counts and sha256::

    OUTPUT/items/shard-000000.tar
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from foundation.checksum import sha256
from foundation.data.media import (
    MEDIA_ENTRIES,
    MediaError,
    MediaKind,
    check_media,
    decode_audio,
    decode_image,
    media_file,
)
from foundation.data.sources import SourceConfig, unisrec_file

ITEM_ENTRIES = frozenset({"meta.json", "txt", "vec.npy", *MEDIA_ENTRIES})  # nothing else
ITEMS_PER_SHARD = 2000
MAX_TEXT_CHARS = 20_000  # one item's text; longer is cut (towers read a few hundred tokens)


def read_item_text(path: str | Path) -> dict[int, str]:
    """A TSV ``item_id<TAB>text`` (ids as in the events); an optional header line, e.g.
    RecBole's typed ``item_id:token<TAB>text:token_seq``, is skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"item text file {path} does not exist (source.item_text_path)")
    texts: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            item, tab, text = line.rstrip("\n").partition("\t")
            if number == 1 and not item.strip().lstrip("-").isdigit():
                continue  # a header
            if not tab or not item.strip().lstrip("-").isdigit():
                raise ValueError(f"{path}:{number}: expected item_id<TAB>text with an integer "
                                 f"item id, got {line.strip()[:80]!r}")
            if int(item) in texts:
                raise ValueError(f"{path}:{number}: item {int(item)} has a second text")
            texts[int(item)] = text.strip()[:MAX_TEXT_CHARS]
    return texts


def read_unisrec_text(directory: str | Path) -> dict[int, str]:
    """A UniSRec dataset's item text (``X.text``, keyed by ASIN) by item index
    (``X.item2index``): the ids its ``.inter`` files use."""
    directory = Path(directory)
    index = {}
    with open(unisrec_file(directory, "item2index")) as f:
        for line in f:
            asin, _, number = line.rstrip("\n").partition("\t")
            index[asin] = int(number)
    texts = {}
    with open(unisrec_file(directory, "text"), encoding="utf-8") as f:
        next(f)  # item_id:token<TAB>text:token_seq
        for line in f:
            asin, _, text = line.rstrip("\n").partition("\t")
            if asin in index:
                texts[index[asin]] = text.strip()[:MAX_TEXT_CHARS]
    return texts


def read_item_vectors(path: str | Path, ids_path: str | Path | None = None
                      ) -> dict[int, np.ndarray]:
    """Vectors from an upstream service: a ``.safetensors`` file with ``vectors`` [N, D] and
    ``item_ids`` [N], or a ``.npy`` matrix with its row ids in ``ids_path`` (.npy or one id
    per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"item vectors file {path} does not exist "
                                f"(source.item_vectors_path)")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        saved = load_file(str(path))
        if {"vectors", "item_ids"} - set(saved):
            raise ValueError(f"{path} must hold tensors 'vectors' [N, D] and 'item_ids' [N], "
                             f"found {sorted(saved)}")
        vectors, ids = saved["vectors"], saved["item_ids"]
    elif path.suffix == ".npy":
        if ids_path is None:
            raise ValueError(f"{path} is a bare matrix: give its row ids as "
                             f"source.item_vector_ids_path=FILE (.npy or one id per line)")
        vectors = np.load(path, allow_pickle=False)
        ids_path = Path(ids_path)
        ids = (np.load(ids_path, allow_pickle=False) if ids_path.suffix == ".npy"
               else np.loadtxt(ids_path, dtype=np.int64, ndmin=1))
    else:
        raise ValueError(f"{path}: item vectors are read from .safetensors or .npy")
    if vectors.ndim != 2 or len(ids) != len(vectors) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{path}: need a [N, D] matrix and N integer item ids, got "
                         f"{vectors.shape} and {len(ids)} ids of {ids.dtype}")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{path}: item vectors hold NaN or inf")
    return {int(i): v.astype(np.float32) for i, v in zip(ids, vectors)}


def read_item_media(directory: str | Path, on_error: str = "raise"
                    ) -> tuple[dict[str, dict[int, tuple[str, bytes]]], list[str]]:
    """``ITEM_ID.jpg|png|wav|flac`` files → ``{"image"|"audio": {raw id: (entry, bytes)}}``,
    each decoded once within the limits; a bad file raises naming it, or with
    ``on_error=skip`` is left out and reported in the second value."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"item media directory {directory} does not exist "
                                f"(source.item_media_dir)")
    media: dict[str, dict[int, tuple[str, bytes]]] = {}
    skipped = []
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        try:
            item, kind, entry = media_file(path)
            if item in media.get(kind.value, {}):
                raise MediaError(f"a second {kind.value} for item {item}")
            data = path.read_bytes()
            check_media(entry, data)
        except MediaError as err:
            if on_error != "skip":
                raise MediaError(f"{path}: {err} (fix or remove it, or build with "
                                 f"on_error=skip to leave it out)") from None
            skipped.append(f"{path.name}: {err}")
            continue
        media.setdefault(kind.value, {})[item] = (entry, data)
    return media, skipped


def read_item_content(source: SourceConfig, on_error: str = "raise"
                      ) -> tuple[dict[str, dict[int, Any]], list[str]]:
    """Every configured kind of item content (``{"text": {raw id: str}, "vectors": ...,
    "image": ..., "audio": ...}``) and the media files skipped as unreadable."""
    content: dict[str, dict[int, Any]] = {}
    skipped: list[str] = []
    if source.item_text_path:
        content["text"] = read_item_text(source.item_text_path)
    elif source.format == "unisrec":
        content["text"] = read_unisrec_text(source.path)
    if source.item_vectors_path:
        content["vectors"] = read_item_vectors(source.item_vectors_path,
                                               source.item_vector_ids_path)
    if source.item_media_dir:
        media, skipped = read_item_media(source.item_media_dir, on_error)
        content.update(media)
    return content, skipped


def content_items(content: dict[str, dict[int, Any]]) -> np.ndarray:
    """The raw ids of every item that has some content (they join the catalogue)."""
    ids = [np.fromiter(rows, dtype=np.int64, count=len(rows)) for rows in content.values()]
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def write_item_shards(root: Path, content: dict[str, dict[int, Any]],
                      remap: Callable[[np.ndarray], np.ndarray], skipped: list[str] = ()
                      ) -> dict[str, Any] | None:
    """``root/items/shard-*.tar`` (one sample per item with content, by item id) and what
    the manifest records about them (with the media ``skipped``); None without content."""
    raw = content_items(content)
    if not len(raw):
        return None
    (root / "items").mkdir(parents=True, exist_ok=True)
    for old in (root / "items").glob("shard-*.tar"):
        old.unlink()
    ids = remap(raw)
    order = np.argsort(ids)
    shards = []
    for number, start in enumerate(range(0, len(order), ITEMS_PER_SHARD)):
        rel = f"items/shard-{number:06d}.tar"
        chunk = order[start:start + ITEMS_PER_SHARD]
        # An int mtime: a float one gets a pax header per member, twice the tar to parse.
        with wds.TarWriter(str(root / rel), encoder=False, mtime=0) as sink:
            for i in chunk.tolist():
                sink.write(_item_sample(int(ids[i]), int(raw[i]), content))
        shards.append({"path": rel, "samples": len(chunk), "sha256": sha256(root / rel)})
    kinds = {kind: {"items": len(content[kind])} for kind in ("text", "image", "audio")
             if kind in content}
    if "vectors" in content:
        dims = {v.shape[0] for v in content["vectors"].values()}
        if len(dims) != 1:
            raise ValueError(f"item vectors of different sizes {sorted(dims)}")
        kinds["vectors"] = {"items": len(content["vectors"]), "dim": dims.pop()}
    return {"shards": shards, "samples": len(raw), "content": kinds,
            "skipped": {"count": len(skipped), "files": list(skipped[:20])}}


def _item_sample(item: int, raw: int, content: dict[str, dict[int, Any]]) -> dict[str, Any]:
    sample: dict[str, Any] = {"__key__": f"i{item:09d}",
                              "meta.json": json.dumps({"item": item, "raw_id": raw}).encode()}
    if raw in content.get("text", {}):
        sample["txt"] = content["text"][raw].encode("utf-8")
    if raw in content.get("vectors", {}):
        sample["vec.npy"] = _npy(content["vectors"][raw])
    for kind in MediaKind:
        if raw in content.get(kind.value, {}):
            entry, data = content[kind.value][raw]
            sample[entry] = data
    return sample


def decode_item(sample: dict[str, Any], modalities: tuple[str, ...] | None = None
                ) -> dict[str, Any]:
    """One item sample → ``{"item": id, "text": str?, "vectors": array?, "image": uint8
    [H, W, 3]?, "audio": (samples, rate)?}`` (no pickle; media within their limits); only
    ``modalities`` are decoded when given."""
    unknown = sorted(k for k in sample if not k.startswith("__") and k not in ITEM_ENTRIES)
    if unknown:
        raise ValueError(f"unexpected entries {unknown} in item {sample.get('__key__')!r} of "
                         f"{sample.get('__url__')}: item shards hold only {sorted(ITEM_ENTRIES)}")
    out: dict[str, Any] = {"item": int(json.loads(sample["meta.json"])["item"])}
    wanted = set(modalities) if modalities is not None else {"text", "vectors", "image", "audio"}
    if "txt" in sample and "text" in wanted:
        out["text"] = sample["txt"].decode("utf-8")
    if "vec.npy" in sample and "vectors" in wanted:
        out["vectors"] = np.load(io.BytesIO(sample["vec.npy"]), allow_pickle=False)
    for entry in ("jpg", "png"):
        if entry in sample and "image" in wanted:
            out["image"] = decode_image(sample[entry])
    for entry in ("wav", "flac"):
        if entry in sample and "audio" in wanted:
            out["audio"] = decode_audio(sample[entry])
    return out


def iter_items(path: str | Path, manifest: dict[str, Any],
               modalities: tuple[str, ...] | None = None) -> Iterator[dict[str, Any]]:
    """Every item sample of a build, decoded (only ``modalities``, when given), checked
    against the manifest's counts."""
    items = manifest.get("items")
    if not items:
        raise ValueError(f"{path} has no item content: build it with source.item_text_path=... "
                         f"or source.item_vectors_path=... (or model.item_content=[])")
    root = Path(path).absolute()
    for shard in items["shards"]:
        rel = Path(shard["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"{root / 'manifest.json'} names item shard {shard['path']!r} "
                             f"outside {root}")
        seen = 0
        for sample in wds.DataPipeline(wds.SimpleShardList([str(root / rel)]),
                                       wds.tarfile_to_samples()):
            seen += 1
            yield decode_item(sample, modalities)
        if seen != shard["samples"]:
            raise ValueError(f"item shard {root / rel} held {seen} items, its manifest says "
                             f"{shard['samples']}: truncated or replaced; rebuild it")


def load_item_content(path: str | Path, manifest: dict[str, Any], modality: str
                      ) -> tuple[np.ndarray, list[Any]]:
    """(item ids, their content) of every item that has ``modality``."""
    ids, values = [], []
    for item in iter_items(path, manifest, (modality,)):
        if modality in item:
            ids.append(item["item"])
            values.append(item[modality])
    return np.array(ids, dtype=np.int64), values
