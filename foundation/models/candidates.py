"""Scoring a member's candidate titles (impressions, messages) against the encoded history."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from foundation.models.content import ItemContent, unit_content
from foundation.models.member import (
    EventEncoder,
    ItemAttributes,
    MemberModelConfig,
    ReadsItemsLikeThePretrain,
    last_states,
    pad_jagged,
)


class TargetAwareScorer(ReadsItemsLikeThePretrain, nn.Module):
    """Candidate-aware attention over the encoded history (DIN-style), then an MLP with
    ``outputs`` logits per candidate.

    Items (the history's and the candidates) are what the pretrained member model reads: the
    table row plus, where the model has them, side information and content (the same module
    names as the next-item model's, so a warm start loads them)."""

    def __init__(self, model: MemberModelConfig, hidden: int, outputs: int = 1,
                 token_features: tuple[str, ...] | None = None,
                 attributes: ItemAttributes | None = None, content: ItemContent | None = None):
        super().__init__()
        dim = model.embedding_dim
        self.encoder = EventEncoder(model, token_features)
        self.attributes, self.content = attributes, content
        # With content: how close the candidate's frozen content is to the history's (mean
        # and max cosine), the towers' own geometry, which no trained weight has to learn.
        self.register_buffer("units", unit_content(content)[0] if content is not None else None,
                             persistent=False)
        scalars = 2 + (2 if content is not None else 0)
        # Normalised inputs: cosines in [-1, 1] next to pretrained dot products in the tens
        # would otherwise start out ignored.
        self.head = nn.Sequential(nn.LayerNorm(5 * dim + scalars),
                                  nn.Linear(5 * dim + scalars, hidden), nn.GELU(),
                                  nn.Dropout(model.dropout), nn.Linear(hidden, outputs))

    def content_affinity(self, batch) -> Tensor:
        """``[candidates, 2]``: each candidate's mean and max content cosine to its history."""
        history, mask = pad_jagged(self.units[batch.item], batch.lengths)  # [B, L, C]
        candidates, placed = pad_jagged(self.units[batch.candidates], batch.candidate_lengths)
        cosines = torch.bmm(candidates, history.transpose(1, 2))[placed]  # [candidates, L]
        rows = mask[torch.repeat_interleave(torch.arange(len(batch), device=mask.device),
                                            batch.candidate_lengths)]
        mean = (cosines * rows).sum(1) / rows.sum(1).clamp(min=1)
        return torch.stack([mean, cosines.masked_fill(~rows, -1.0).amax(1)], -1)

    def logits(self, batch, emb: dict[str, Tensor]) -> Tensor:
        """``[candidates, outputs]`` for ``batch.candidates`` (embedded as ``emb["candidate"]``)."""
        self.begin_content_step(torch.cat([batch.item, batch.candidates]))
        emb = {**emb, "item": self.with_item_parts(batch.item, emb["item"])}
        states, mask = self.encoder(emb, batch.lengths, timestamps=batch.timestamp)
        rows = torch.repeat_interleave(torch.arange(len(batch), device=states.device),
                                       batch.candidate_lengths)
        cand = self.with_item_parts(batch.candidates, emb["candidate"])
        attn = torch.einsum("kd,kld->kl", cand, states[rows]) / cand.shape[-1] ** 0.5
        attn = attn.masked_fill(~mask[rows], float("-inf")).softmax(-1)
        pooled = torch.einsum("kl,kld->kd", attn, states[rows])
        last = last_states(states, mask)[rows]
        # The whole history's mean: what the member is like beyond this candidate (devices,
        # breadth of taste), which attention to the candidate leaves out.
        summary = ((states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1))[rows]
        # The pretrained next-item score (last · candidate) is the strongest single signal;
        # an MLP over concatenations cannot form dot products by itself, so hand them over.
        scores = torch.stack([(last * cand).sum(-1), (pooled * cand).sum(-1)], -1)
        if self.units is not None:
            scores = torch.cat([scores, self.content_affinity(batch)], -1)
        return self.head(torch.cat([pooled * cand, last * cand, cand, last, summary, scores], -1))
