"""Fine-tune for retrieval (the "what to watch next" row): a two-tower model over the whole
catalogue, warm-started from a pretrain run, trained on the events the surface counts as
success (``recipe.labels``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from foundation.data.batch import SequenceBatch
from foundation.models.finetune import FinetuneConfig
from foundation.recipes.pretrain_member_fm import NextItemModel, PretrainConfig, PretrainMemberFM
from foundation.tasks import register_recipe, split_at_last


def default_labels() -> dict[str, list[str]]:
    return {"action": ["complete", "thumbs_up", "add_to_list"]}


def label_events(batch: SequenceBatch, masks: dict[str, Tensor]) -> Tensor:
    """Which of the batch's events are labels ``[sum(lengths)]``: every feature in ``masks``
    (its vocabulary as a bool mask) has an allowed value."""
    label = torch.ones_like(batch.item, dtype=torch.bool)
    for name, allowed in masks.items():
        label &= allowed[batch.events[name]]
    return label


@dataclass
class RetrievalConfig(PretrainConfig, FinetuneConfig):
    name: str = "finetune_retrieval"
    # The label events: those whose every listed feature has one of the listed values (e.g.
    # {action: [complete], device: [tv]}: completions on TV). Each state learns to retrieve
    # the next event when it is one.
    labels: dict[str, list[str]] = field(default_factory=default_labels)
    ann_candidates: int = 100


class TwoTowerRetrieval(NextItemModel):
    """Member tower: the pretrained event encoder and a new head (the identity at start);
    item tower: the pretrained item table (with side features and content where the run has
    them). In-batch plus sampled negatives with logQ correction, on label targets only."""

    def __init__(self, *args, labels: dict[str, Tensor], **kwargs):
        super().__init__(*args, **kwargs)
        dim = self.encoder.cfg.embedding_dim
        self.member_head = nn.Linear(dim, dim)
        with torch.no_grad():
            self.member_head.weight.copy_(torch.eye(dim))
            self.member_head.bias.zero_()
        self.label_features = tuple(labels)
        for name, allowed in labels.items():  # [vocabulary] bool per feature
            self.register_buffer(f"label_{name}", allowed, persistent=False)

    def training_pairs(self, states, mask, batch):
        query_index, target_index = super().training_pairs(states, mask, batch)
        masks = {name: getattr(self, f"label_{name}") for name in self.label_features}
        keep = label_events(batch, masks)[target_index]
        return query_index[keep], target_index[keep]

    def queries(self, states, items, lengths, mask, temperature=1.0):
        return super().queries(self.member_head(states), items, lengths, mask, temperature)


@register_recipe
class FinetuneRetrieval(PretrainMemberFM):
    name = "finetune_retrieval"
    config_class = RetrievalConfig
    summary = ("retrieval fine-tune: two towers from the pretrain, label events only, "
               "full-catalogue and ANN recall")
    eval_metric = "hr@10"  # one target per member: HR@K is recall@K
    model_class = TwoTowerRetrieval
    token_batches = False  # a mean over the label events among the pairs
    new_keys = ("member_head.",)

    def __init__(self, cfg, manifest, item_counts):
        super().__init__(cfg, manifest, item_counts)
        if not self.sharded_items:
            raise ValueError("finetune_retrieval warm-starts its item tower from the sharded "
                             "item table: use model.item_table=sharded (and pretrain with it)")
        self.labels = self._label_masks()

    def _label_masks(self) -> dict[str, Tensor]:
        masks = {}
        for name, values in self.recipe.labels.items():
            feature = self.schema.features.get(name)
            if feature is None or not feature.vocab:
                raise ValueError(f"recipe.labels.{name}: the data has no categorical event "
                                 f"feature {name!r} (it has {list(self.schema.stored)})")
            unknown = sorted(set(values) - set(feature.vocab))
            if unknown or not values:
                raise ValueError(f"recipe.labels.{name}={list(values)}: {unknown or 'empty'}; "
                                 f"choose from {list(feature.vocab)}")
            masks[name] = torch.tensor([n in values for n in feature.names])
        return masks

    def model_options(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def eval_targets(self, batch):
        """Each member's newest label event, held out, and the history before it."""
        return split_at_last(batch, label_events(batch, self.labels))
