"""Scoring a member's candidate titles (impressions, messages) against the encoded history."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from foundation.models.content import ItemContent, unit_content
from foundation.models.dropout import Dropout
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
                                  Dropout(model.dropout), nn.Linear(hidden, outputs))

    def logits(self, batch, emb: dict[str, Tensor]) -> Tensor:
        """``[candidates, outputs]`` for ``batch.candidates`` (embedded as ``emb["candidate"]``)."""
        self.begin_content_step(torch.cat([batch.item, batch.candidates]))
        emb = {**emb, "item": self.with_item_parts(batch.item, emb["item"])}
        states, mask = self.encoder(emb, batch.lengths, timestamps=batch.timestamp)
        candidates, placed = pad_jagged(
            self.with_item_parts(batch.candidates, emb["candidate"]), batch.candidate_lengths)
        affinity = None
        if self.units is not None:
            affinity = content_affinity(pad_jagged(self.units[batch.item], batch.lengths)[0],
                                        mask, pad_jagged(self.units[batch.candidates],
                                                         batch.candidate_lengths)[0])
        return self.head_logits(states, mask, candidates, affinity)[placed]

    def head_logits(self, states: Tensor, mask: Tensor, candidates: Tensor,
                    affinity: Tensor | None = None) -> Tensor:
        """``[B, C, outputs]``: each row's ``candidates`` ``[B, C, D]`` scored against its
        encoded history ``states`` ``[B, L, D]`` (``mask``: its events); ``affinity``
        ``[B, C, 2]`` with content. Padded candidates get scores that nobody reads."""
        scale = candidates.shape[-1] ** 0.5
        attn = torch.einsum("bcd,bld->bcl", candidates, states) / scale
        attn = attn.masked_fill(~mask.unsqueeze(1), float("-inf")).softmax(-1)
        pooled = torch.einsum("bcl,bld->bcd", attn, states)
        last = last_states(states, mask).unsqueeze(1).expand_as(candidates)
        # The whole history's mean: what the member is like beyond this candidate (devices,
        # breadth of taste), which attention to the candidate leaves out.
        summary = ((states * mask.unsqueeze(-1)).sum(1)
                   / mask.sum(1, keepdim=True).clamp(min=1)).unsqueeze(1).expand_as(candidates)
        # The pretrained next-item score (last · candidate) is the strongest single signal;
        # an MLP over concatenations cannot form dot products by itself, so hand them over.
        scores = torch.stack([(last * candidates).sum(-1), (pooled * candidates).sum(-1)], -1)
        if affinity is not None:
            scores = torch.cat([scores, affinity], -1)
        return self.head(torch.cat([pooled * candidates, last * candidates, candidates, last,
                                    summary, scores], -1))


def content_affinity(history: Tensor, mask: Tensor, candidates: Tensor) -> Tensor:
    """``[B, C, 2]``: each candidate's mean and max content cosine to its row's history
    (``history`` ``[B, L, U]`` and ``candidates`` ``[B, C, U]``: unit content vectors)."""
    cosines = torch.bmm(candidates, history.transpose(1, 2))  # [B, C, L]
    events = mask.unsqueeze(1)
    mean = (cosines * events).sum(-1) / events.sum(-1).clamp(min=1)
    return torch.stack([mean, cosines.masked_fill(~events, -1.0).amax(-1)], -1)


class CandidateScorerProgram(nn.Module):
    """The exported path of a candidate scorer: the history as event tokens (as the member
    encoder's program reads them: ``tokens`` ``[B, L, D]`` left-aligned, ``lengths``, and for
    encoders that read time ``timestamps``), each row's ``candidates`` ``[B, C, D]`` (the
    items' vectors) and, with content, the history's and the candidates' unit content vectors
    → ``[B, C, outputs]`` logits. Inputs are positional, in ``input_names`` order."""

    def __init__(self, scorer: TargetAwareScorer):
        super().__init__()
        self.scorer = scorer
        self.input_names = ["tokens", "lengths", *(["timestamps"] if scorer.encoder.uses_time
                                                   else []), "candidates",
                            *(["history_units", "candidate_units"]
                              if scorer.units is not None else [])]

    def forward(self, *inputs: Tensor) -> Tensor:
        given = dict(zip(self.input_names, inputs))
        tokens = given["tokens"]
        mask = torch.arange(tokens.shape[1], device=tokens.device) < given["lengths"].unsqueeze(1)
        states = self.scorer.encoder.encode_padded(tokens, mask, timestamps=given.get("timestamps"))
        affinity = None
        if "history_units" in given:
            affinity = content_affinity(given["history_units"], mask, given["candidate_units"])
        return self.scorer.head_logits(states, mask, given["candidates"], affinity)
