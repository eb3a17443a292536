"""What a recipe is: a task object. The library owns the loop; a task owns its model head,
its loss and its evaluation. Shared pieces (item features, batch surgery, synchronised
evaluation over ranks) live here so recipes stay thin."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from foundation.choices import BundleKind
from foundation.config import TrainConfig
from foundation.data.batch import SequenceBatch
from foundation.data.items import load_item_content
from foundation.data.schema import EventSchema
from foundation.models.content import (
    CACHE_DIR,
    ContentAdapter,
    ItemContent,
    TunedTextAdapter,
    content_vectors,
    lower_token_states,
    source_cache,
)
from foundation.models.finetune import FinetuneConfig
from foundation.models.member import ItemAttributes, SparseArch, sharded_items, sparse_features
from foundation.models.towers import MiniLMTextTower, Modality

if TYPE_CHECKING:  # built by the batch (SequenceBatch.kjt); compose stays free of TorchRec
    from torchrec import KeyedJaggedTensor

# What a pretrain run's dense state holds besides its event encoder (the next-item model's
# item-side parts): a downstream recipe that keeps only the encoder leaves these.
PRETRAIN_ONLY_KEYS = ("fallback", "item_table.", "attributes.", "content.", "match.", "history.")

# Every recipe, by name: a Task subclass decorated with ``register_recipe`` (recipes/).
RECIPES: dict[str, type[Task]] = {}


def register_recipe(task: type[Task]) -> type[Task]:
    """Class decorator making ``task`` the recipe ``task.name``: ``recipe=NAME`` composes
    ``configs/recipe/NAME.yaml`` over ``task.config_class`` and trains this task."""
    known = RECIPES.get(task.name)
    if known is not None and known.__qualname__ != task.__qualname__:
        raise ValueError(f"recipe {task.name!r} is registered twice: {known.__module__}."
                         f"{known.__qualname__} and {task.__module__}.{task.__qualname__}")
    RECIPES[task.name] = task
    return task


def read_run_config(run_dir: Path) -> DictConfig:
    """A run's resolved config over the current schemas: keys added to the framework since
    the run was trained take their defaults (which keep the old behaviour)."""
    saved = OmegaConf.load(run_dir / "config.yaml")
    recipe = RECIPES.get(saved.recipe.name)
    if recipe is None:
        raise ValueError(f"{run_dir} was trained with recipe {saved.recipe.name!r}, which this "
                         f"version does not have (recipes: {sorted(RECIPES)})")
    schema = OmegaConf.structured(TrainConfig)
    schema.recipe = OmegaConf.structured(recipe.config_class)
    merged = OmegaConf.merge(schema, saved)
    return OmegaConf.create(OmegaConf.to_container(merged, resolve=True))


class Task:
    name: ClassVar[str]
    config_class: ClassVar[type]
    summary: ClassVar[str]
    data_mode: ClassVar[str] = "sequence"  # what the loader yields: sequence | ranking | items
    eval_metric: ClassVar[str]  # headline validation metric (higher is better)
    export_kind: ClassVar[BundleKind | None] = None  # the serving bundle its runs export to
    # Whether the training loss is a mean over ``loss_terms`` (so data.tokens_per_batch can
    # weight batches of any size to the mean over every rank's terms).
    token_batches: ClassVar[bool] = False

    def __init__(self, cfg: DictConfig, manifest: dict[str, Any], item_counts: np.ndarray):
        self.cfg, self.recipe, self.manifest = cfg, cfg.recipe, manifest
        self.num_items = int(manifest["vocab"]["item"])
        self.item_counts = torch.as_tensor(item_counts, dtype=torch.float32)
        self.sharded_items = sharded_items(cfg.model)
        self.schema = EventSchema.from_manifest(manifest)

    def item_attributes(self) -> tuple[Tensor, Tensor, int] | None:
        """The dataset's item side information, if it has any: (values, offsets, vocabulary)
        with the attribute ids of item i at ``values[offsets[i]:offsets[i+1]]``."""
        name = self.manifest.get("files", {}).get("item_attributes")
        if not name:
            return None
        with np.load(f"{self.cfg.data.path}/{name}", allow_pickle=False) as saved:
            values, offsets = torch.as_tensor(saved["values"]), torch.as_tensor(saved["offsets"])
        return values, offsets, int(self.manifest["vocab"]["attribute"])

    def item_content(self) -> ItemContent | None:
        """The adapted content of every modality in ``model.item_content`` (None: ID only)."""
        model = self.cfg.model
        if not model.item_content:
            return None
        adapters = {}
        for modality in model.item_content:
            modality = Modality(modality)
            vectors, has = content_vectors(modality, self.cfg.data.path, self.manifest,
                                           self.num_items, model.text_tower,
                                           Path(self.cfg.run_dir) / CACHE_DIR,
                                           model.item_encoder, self._source_cache())
            if modality == Modality.text and model.text_tower.trainable_layers:
                adapters[modality.value] = self._tuned_text(vectors, has)
            else:
                adapters[modality.value] = ContentAdapter(vectors, has, model.embedding_dim,
                                                          model.dropout)
        return ItemContent(adapters)

    def item_parts(self) -> tuple[ItemAttributes | None, ItemContent | None]:
        """What a model adds to each item's table row: the dataset's side information (with
        ``model.side_features``) and the content of ``model.item_content``."""
        found = self.item_attributes() if self.cfg.model.side_features else None
        attributes = ItemAttributes(*found, dim=self.cfg.model.embedding_dim) if found else None
        return attributes, self.item_content()

    def _tuned_text(self, vectors: Tensor, has: Tensor) -> TunedTextAdapter:
        """The text tower with its top layers trained (every rank keeps the frozen layers'
        token states of the whole catalogue)."""
        model = self.cfg.model
        tower = MiniLMTextTower(model.text_tower)
        ids, texts = load_item_content(self.cfg.data.path, self.manifest, Modality.text.value)
        tokens, offsets = lower_token_states(tower, ids, texts, self.num_items)
        return TunedTextAdapter(vectors, has, model.embedding_dim, model.dropout, tower,
                                tokens, offsets)

    def item_features(self) -> list[dict[str, Any]]:
        """The item side of the feature schema (the event side is ``schema``): what an item's
        vector is made of, where each part lives and how serving obtains it."""
        model, vocab = self.cfg.model, self.manifest["vocab"]
        parts = [{"name": "item", "kind": "id", "size": self.num_items,
                  "lives": ("sharded table (TorchRec planner)" if self.sharded_items
                            else "replicated table (dense, every rank)"),
                  "served_from": "History(items=...), catalogue ids; embeddings/item_vectors"}]
        if vocab.get("attribute") and model.side_features:
            parts.append({"name": "attribute", "kind": "categorical set",
                          "size": int(vocab["attribute"]),
                          "lives": "replicated table (dense), averaged per item",
                          "served_from": "folded into embeddings/item_vectors at export"})
        tuned = model.text_tower.trainable_layers
        towers = {Modality.text: (f"all-MiniLM-L6-v2, top {tuned} layers trained (catalogue "
                                  f"refreshed every {model.text_tower.refresh_every} steps)"
                                  if tuned else "frozen all-MiniLM-L6-v2 (cached per run)"),
                  Modality.vectors: "upstream vectors from the item shards",
                  Modality.image: f"frozen tower of item encoder {model.item_encoder}",
                  Modality.audio: f"frozen tower of item encoder {model.item_encoder}"}
        for modality in map(Modality, model.item_content):
            parts.append({"name": modality.value, "kind": "content",
                          "lives": f"{towers[modality]} + trained adapter",
                          "served_from": f"add_items({{id: {{'{modality.value}': ...}}}})"})
        if model.content_match:
            parts.append({"name": "content_match", "kind": "content similarity",
                          "lives": "the modalities' frozen vectors as unit vectors, recency-"
                                   "weighted over the history (no ID table)",
                          "served_from": "embeddings/content_match.safetensors; new items "
                                         "through add_items"})
        return parts

    @functools.cached_property  # read once, not at every validation
    def popularity_baselines(self) -> dict[str, Tensor]:
        """Item scores of the most-popular baselines: counted over the training data and,
        where the build wrote them, over all data (the leaky variant some papers report)."""
        baselines = {"most_popular": self.item_counts}
        all_counts = self.manifest.get("files", {}).get("item_counts_all")
        if all_counts:
            path = f"{self.cfg.data.path}/{all_counts}"
            baselines["most_popular_all"] = torch.as_tensor(np.load(path, allow_pickle=False),
                                                            dtype=torch.float32)
        return baselines

    @functools.cached_property
    def frozen_text_vectors(self) -> Tensor | None:
        """Every item's frozen text-tower vector, where the data has item text and the run
        reads it or has cold items (collective the first time, cached in the run dir like the
        model's own content)."""
        items = self.manifest.get("items") or {}
        reads_text = Modality.text in [Modality(m) for m in self.cfg.model.item_content]
        if "text" not in items.get("content", {}) or not (reads_text or self.cold_items is not None):
            return None  # a content baseline for runs that study content or cold items
        vectors, _ = content_vectors(Modality.text, self.cfg.data.path, self.manifest,
                                     self.num_items, self.cfg.model.text_tower,
                                     Path(self.cfg.run_dir) / CACHE_DIR,
                                     reuse_from=self._source_cache())
        return vectors

    def _source_cache(self) -> Path | None:
        """A warm start's source run encoded the same catalogue: its content cache (used
        where the fingerprint matches, so nothing is encoded twice)."""
        source = self.init_from()
        return source_cache(source) if source else None

    @functools.cached_property
    def cold_items(self) -> Tensor | None:
        """``[V]`` bool: the items the build held out of training and validation (None
        without any)."""
        return self._item_mask("cold_items")

    @functools.cached_property
    def cold_val_items(self) -> Tensor | None:
        """``[V]`` bool: the items the build held out of training only (None without any)."""
        return self._item_mask("cold_val_items")

    def cold_targets(self, split: str | None) -> Tensor | None:
        """The items whose users form ``split``'s cold group: on the validation split those
        held out of training only (validation holds no other cold item), else the cold items."""
        if split == self.cfg.data.val_split and self.cold_val_items is not None:
            return self.cold_val_items
        return self.cold_items

    def _item_mask(self, kind: str) -> Tensor | None:
        if not (self.manifest.get(kind) or {}).get("count"):
            return None
        path = Path(self.cfg.data.path) / self.manifest["files"][kind]
        mask = torch.zeros(self.num_items, dtype=torch.bool)
        mask[torch.as_tensor(np.load(path, allow_pickle=False))] = True
        return mask

    # -- model -----------------------------------------------------------------------
    def build_sparse(self, device: torch.device) -> nn.Module:
        return SparseArch(self.num_items, self.cfg.model.embedding_dim, self.schema.sizes,
                          device, with_items=self.sharded_items)

    @property
    def token_features(self) -> tuple[str, ...]:
        """What each event's token sums: the item and the schema's features."""
        return ("item", *self.schema.token_features(self.cfg.model.context_features))

    def build_dense(self) -> nn.Module:
        raise NotImplementedError

    def loader_options(self) -> dict[str, Any]:
        """What this task's loader needs besides the data config (the item loader's
        modalities, ...)."""
        return {}

    def init_from(self) -> str | None:
        """A run (or checkpoint) to warm-start from, if the recipe has one."""
        settings = self.finetune()
        return settings.init_from if settings is not None else None

    # A warm start's allow-lists (prefixes of dense state-dict keys): the keys this recipe's
    # model adds (its head: initialised fresh, trained in every fine-tune mode) and the
    # source's keys it leaves. Any other key missing on either side fails, naming it.
    new_keys: ClassVar[tuple[str, ...]] = ()
    unused_keys: ClassVar[tuple[str, ...]] = ()

    def finetune(self) -> FinetuneConfig | None:
        """The recipe's fine-tune settings (``recipe.mode``, ...), if it is a fine-tune."""
        return self.recipe if "mode" in self.recipe else None

    # -- a training step -------------------------------------------------------------
    def loss_terms(self, batch: SequenceBatch) -> int:
        """How many terms this rank's training loss averages over: its next-item pairs."""
        return int((batch.lengths - 1).clamp(min=0).sum())

    def features(self, batch: SequenceBatch) -> tuple[KeyedJaggedTensor, dict[str, Tensor]]:
        """Item lookups for one training step, and extra inputs of the dense forward."""
        return sparse_features(batch, candidates=batch.candidates,
                               candidate_lengths=batch.candidate_lengths), {}

    @torch.no_grad()
    def candidate_columns(self, model, batches: Iterable[SequenceBatch],
                          columns: Callable[[SequenceBatch, Tensor], dict[str, Tensor]]
                          ) -> dict[str, np.ndarray]:
        """For recipes scoring given candidates: the model's output on every batch (in step
        with the other ranks), and from every rank the per-candidate ``columns(batch,
        output)`` (e.g. score and label) plus each candidate's ``row_id``."""
        names, parts = None, {}
        for batch, real in synchronised(batches, model.world_size):
            kjt, _ = self.features(batch)
            out = model.dense(batch, model.embed(kjt), mode="eval")
            values = {**columns(batch, out), "row_id": candidate_row_ids(batch)}
            names = names or sorted(values)  # the dummy batch of a finished rank names them too
            if real:
                for name in names:
                    parts.setdefault(name, []).append(values[name].double().numpy())
        return {name: all_concat(parts.get(name, []), model.world_size) for name in names or ()}

    def evaluate(self, model, batches: Iterable[SequenceBatch], split: str | None = None,
                 calibrate: bool = False) -> dict[str, Any]:
        """Metrics of ``model`` on ``batches`` (from ``split``); with ``calibrate`` (validation
        in training) the task may also fit what it calibrates on that split."""
        raise NotImplementedError


class CandidateTask(Task):
    """A recipe that scores the candidates it is given (impressions, messages) with a
    target-aware scorer (models/candidates.py) on the pretrained event encoder and item
    table; it exports a ``candidate_scorer`` bundle."""

    export_kind = BundleKind.candidate_scorer
    output_names: ClassVar[tuple[str, ...]]  # the scorer's logits per candidate, in order
    output_meaning: ClassVar[str]  # how serving turns them into decisions
    new_keys = ("head.",)  # the scorer's MLP; the event encoder comes from the pretrain run
    unused_keys = PRETRAIN_ONLY_KEYS

    def __init__(self, cfg: DictConfig, manifest: dict[str, Any], item_counts: np.ndarray):
        super().__init__(cfg, manifest, item_counts)
        if not self.sharded_items:
            raise ValueError(f"{self.name} needs model.item_table=sharded (its candidates are "
                             f"looked up in the sharded item table); pretrain with it too")

    @torch.no_grad()
    def catalogue_vectors(self, model, mode: str = "tokens") -> Tensor:
        """Every item's vector ``[V, D]`` as the scorer reads it (table row + side features +
        content), in event tokens and as a candidate alike; collective."""
        return model.dense_module.with_item_parts(torch.arange(self.num_items), model.catalogue())

    @torch.no_grad()
    def raw_logits(self, model, batch: SequenceBatch) -> Tensor:
        """The scorer's logits ``[candidates, outputs]`` (``output_names``); collective."""
        kjt, _ = self.features(batch)
        return model.dense_module.logits(batch, model.embed(kjt))


def take_events(batch: SequenceBatch, keep: Tensor) -> SequenceBatch:
    """A batch with only the events where ``keep`` is true (lengths recomputed)."""
    rows = torch.repeat_interleave(torch.arange(len(batch)), batch.lengths)
    lengths = torch.bincount(rows[keep], minlength=len(batch))
    return dataclasses.replace(batch, lengths=lengths, item=batch.item[keep],
                               timestamp=batch.timestamp[keep],
                               events={k: v[keep] for k, v in batch.events.items()})


def keep_last(batch: SequenceBatch, n: int) -> SequenceBatch:
    """A batch with each row cut to its newest ``n`` events (what the loader keeps)."""
    ends = torch.repeat_interleave(torch.cumsum(batch.lengths, 0), batch.lengths)
    return take_events(batch, ends - torch.arange(batch.item.numel()) <= n)


def split_last_event(batch: SequenceBatch) -> tuple[SequenceBatch, Tensor]:
    """(history without each row's newest event, that newest item): leave-one-out targets."""
    ends = torch.cumsum(batch.lengths, 0) - 1
    keep = torch.ones_like(batch.item, dtype=torch.bool)
    keep[ends] = False
    return take_events(batch, keep), batch.item[ends]


def split_at_last(batch: SequenceBatch, marked: Tensor) -> tuple[SequenceBatch, Tensor]:
    """(each row's events before its newest ``marked`` event, that event's item), for the
    rows that have a marked event with history before it (the others are dropped)."""
    rows = torch.repeat_interleave(torch.arange(len(batch)), batch.lengths)
    position = torch.arange(batch.item.numel())
    last = torch.full((len(batch),), -1, dtype=torch.int64).scatter_reduce(
        0, rows[marked], position[marked], reduce="amax")
    kept = last > batch.offsets()[:-1]  # a marked event after the row's first
    history = take_events(batch, (position < last[rows]) & kept[rows])
    history = dataclasses.replace(history, sample_ids=history.sample_ids[kept],
                                  lengths=history.lengths[kept])
    return history, batch.item[last[kept]]


ROW_SLOTS = 1 << 10  # a candidate's evaluation id: sample_id * ROW_SLOTS + its index in the row


def candidate_row_ids(batch: SequenceBatch) -> Tensor:
    """Each candidate's id, the same whatever the batch or rank: ``foundation eval compare``
    pairs two runs' scores of the same candidate by it."""
    lengths = batch.candidate_lengths
    if len(lengths) and int(lengths.max()) > ROW_SLOTS:
        raise ValueError(f"a row holds {int(lengths.max())} candidates; evaluation ids allow "
                         f"{ROW_SLOTS} per member")
    starts = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    within = torch.arange(len(starts)) - starts
    return torch.repeat_interleave(batch.sample_ids, lengths) * ROW_SLOTS + within


def synchronised(batches: Iterable[SequenceBatch], world_size: int
                 ) -> Iterator[tuple[SequenceBatch, bool]]:
    """Iterate until every rank is done; a finished rank replays a dummy batch.

    Sharded lookups are collectives, so all ranks must run the same number of forwards even
    when their shares of a split differ. Yields ``(batch, is_real)``.
    """
    it, dummy = iter(batches), None
    while True:
        batch = next(it, None)
        dummy = dummy if dummy is not None else batch
        more = torch.tensor([batch is not None], dtype=torch.int32)
        if world_size > 1:
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        if batch is None and dummy is None:
            raise RuntimeError("this rank got no evaluation data: the split has fewer shards "
                               "than ranks × loader workers; rebuild it with more shards")
        yield (batch, True) if batch is not None else (dummy, False)


def all_max(flags: Tensor, world_size: int) -> Tensor:
    """Element-wise OR of a bool tensor over ranks."""
    values = flags.to(torch.int32)
    if world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.bool()


def all_concat(arrays: list[np.ndarray], world_size: int) -> np.ndarray:
    """Concatenate float arrays from every rank along their first axis (tensor collectives,
    no pickling); every rank's arrays share their other dimensions."""
    local = torch.as_tensor(np.concatenate(arrays) if arrays else np.zeros(0), dtype=torch.float64)
    if world_size == 1:
        return local.numpy()
    trailing, local = local.shape[1:], local.reshape(-1)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([local.numel()]))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.float64)
    padded[: local.numel()] = local
    parts = [torch.zeros(longest, dtype=torch.float64) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    gathered = torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])
    return gathered.reshape(-1, *trailing).numpy()
