"""Retrieval losses: sampled softmax with logQ correction, and full softmax as its limit."""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from foundation.distributed.collectives import gather_rows, row_counts, world
from foundation.kernels.dispatch import Kernel
from foundation.kernels.softmax import CHUNK_ELEMENTS, scores_logsumexp
from foundation.models.history import add_pairs


class Loss(str, Enum):
    """``sampled_softmax``: in-batch targets + uniform negatives (any catalogue);
    ``full_softmax``: every item, exactly; on a sharded table each rank scores every rank's
    queries against its own slice of the catalogue (``sharded_softmax_loss``), so no rank
    looks up the whole table."""

    sampled_softmax = "sampled_softmax"
    full_softmax = "full_softmax"


# (query, item, offset) triples: score offsets of some items for some queries (HistoryBias)
Offsets = tuple[Tensor, Tensor, Tensor]


def next_item_pairs(states: Tensor, mask: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Pair each state with the event after it.

    Returns ``(query_index, target_index)``: flat indices into the padded ``states`` view
    ``[B*L]`` and into the jagged event values ``[sum(lengths)]``. State t of a row predicts
    event t+1 of the same row, so the last event of each row is never a query.
    """
    batch, longest = mask.shape
    starts = torch.cumsum(lengths, 0) - lengths
    rows, cols = torch.nonzero(mask[:, 1:], as_tuple=True)  # positions with a next event
    query_index = rows * longest + cols
    target_index = starts[rows] + cols + 1
    return query_index, target_index


def log_item_probability(item_counts: Tensor) -> Tensor:
    """Log popularity of each item, add-one smoothed (unseen items still have a proposal
    rate), padding id 0 excluded: the ``log_item_prob`` of ``sampled_softmax_loss``."""
    counts = item_counts + 1.0
    counts[0] = 0.0
    return (counts / counts.sum()).clamp_min(1e-12).log()


def sampled_softmax_loss(queries: Tensor, target_ids: Tensor, target_emb: Tensor,
                         negative_ids: Tensor, negative_emb: Tensor,
                         log_item_prob: Tensor | None, in_batch: bool = True,
                         temperature: float = 1.0, absent: Tensor | None = None,
                         offsets: Offsets | None = None, popular: int = 0,
                         shared: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Softmax over {the target} ∪ in-batch targets ∪ shared negatives.

    ``log_item_prob`` (log popularity over items) enables logQ correction: each candidate's
    logit is reduced by the log of how often the samplers propose it, so popular items that
    appear as in-batch negatives are not over-penalised (Yi et al., RecSys 2019): uniform
    negatives at a constant rate, the last ``popular`` negatives (drawn by popularity) and
    in-batch targets at the popularity's. ``shared`` (ids, vectors): other ranks' targets,
    more in-batch negatives. Candidates equal to a row's own target ("accidental hits") are
    masked out. ``offsets`` are added to the logits of the items they name, wherever those
    are candidates.
    """
    ids = [target_ids] if in_batch else []
    embs = [target_emb] if in_batch else []
    if in_batch and shared is not None:
        ids.append(shared[0])
        embs.append(shared[1])
    ids.append(negative_ids)
    embs.append(negative_emb)
    cand_ids, cand_emb = torch.cat(ids), torch.cat(embs)
    pos_logit = (queries * target_emb).sum(-1, keepdim=True) / temperature
    logits = queries @ cand_emb.T / temperature
    if log_item_prob is not None:
        n_in_batch = len(cand_ids) - len(negative_ids)
        num_items = log_item_prob.numel() - 1  # id 0 is padding
        rate = ((negative_ids.numel() - popular) / num_items
                + (n_in_batch + popular) * log_item_prob.exp())
        log_q = rate.clamp_min(1e-12).log()
        logits = logits - log_q[cand_ids]
        pos_logit = pos_logit - log_q[target_ids].unsqueeze(-1)
    if offsets is not None:
        logits, pos_logit = _add_offsets(logits, pos_logit, cand_ids, target_ids, offsets)
    logits = logits.masked_fill(cand_ids.unsqueeze(0) == target_ids.unsqueeze(1), float("-inf"))
    if absent is not None:  # items left out of training ([V] bool) are never negatives
        logits = logits.masked_fill(absent[cand_ids].unsqueeze(0), float("-inf"))
    full = torch.cat([pos_logit, logits], dim=1).float()  # bf16 trunks: an fp32 softmax
    return F.cross_entropy(full, torch.zeros_like(target_ids))


def _add_offsets(logits: Tensor, pos_logit: Tensor, cand_ids: Tensor, target_ids: Tensor,
                 offsets: Offsets) -> tuple[Tensor, Tensor]:
    """Each offset at every candidate column holding its item (candidates repeat: in-batch
    targets) and at its query's target."""
    query, item, value = offsets
    sorted_ids, order = cand_ids.sort()
    first = torch.searchsorted(sorted_ids, item)
    count = torch.searchsorted(sorted_ids, item, right=True) - first
    pair = torch.repeat_interleave(torch.arange(len(item), device=item.device), count)
    within = torch.arange(len(pair), device=item.device) - (torch.cumsum(count, 0) - count)[pair]
    column = order[first[pair] + within]
    logits = logits.index_put((query[pair], column), value[pair].to(logits.dtype), accumulate=True)
    hit = item == target_ids[query]
    pos_logit = pos_logit.index_put((query[hit], torch.zeros_like(query[hit])),
                                    value[hit].to(pos_logit.dtype), accumulate=True)
    return logits, pos_logit


def full_softmax_loss(queries: Tensor, target_ids: Tensor, catalogue: Tensor,
                      absent: Tensor | None = None, offsets: Offsets | None = None,
                      kernel: Kernel | str = Kernel.auto) -> Tensor:
    """Cross-entropy over the whole catalogue; ``catalogue`` holds items 1..V-1 in order (id 0
    is padding). The limit of the sampled loss, without its candidate bookkeeping.
    ``absent`` ([V] bool) leaves items out of the softmax (never a training target);
    ``offsets`` are added to the logits of the items they name. Without offsets the logits
    are never materialised (``kernels.scores_logsumexp``, ``kernel``: its implementation)."""
    if offsets is None:  # the whole catalogue as one slice, starting at item 1
        lse, target = _slice_scores(queries, target_ids, catalogue, 1, absent, SCORE_CHUNK,
                                    kernel)
        return (lse - target).mean()
    logits = add_pairs((queries @ catalogue.T).float(), offsets, column_offset=1)
    if absent is not None:
        logits = logits.masked_fill(absent[1:], float("-inf"))
    return F.cross_entropy(logits, target_ids - 1)


SCORE_CHUNK = 1 << 15  # catalogue items scored at once by the sharded softmax
NO_ITEM = -1e30  # a left-out item's logit: finite, so a slice with none left has no NaN grads


def sharded_softmax_loss(queries: Tensor, target_ids: Tensor, shard: Tensor, start: int,
                         absent: Tensor | None = None, offsets: Offsets | None = None,
                         chunk: int = SCORE_CHUNK, kernel: Kernel | str = Kernel.auto) -> Tensor:
    """``full_softmax_loss`` with the catalogue split across ranks, never gathered: this
    rank holds ``shard``, the vectors of items ``start .. start + len(shard) - 1``
    (``collectives.catalogue_slice``), and scores every rank's queries against them, ``chunk``
    items at a time (recomputed in backward, so the logits held are at most queries ×
    ``chunk`` and, through the fused kernel, ``CHUNK_ELEMENTS``);
    each query's log-sum-exp and target logit are combined over ranks. Without ``offsets`` the
    slice's log-sum-exp is ``kernels.scores_logsumexp`` (``kernel``: its implementation).
    Gradients reach each slice's rows on its own rank only. ``absent`` ([V] bool) and
    ``offsets`` (this rank's queries') as in ``full_softmax_loss``. Collective: every rank
    calls it."""
    rank, size = world()
    if size == 1:
        return full_softmax_loss(queries, target_ids, shard, absent, offsets, kernel)
    counts = row_counts(len(queries))
    first = sum(counts[:rank])  # this rank's first row among all queries
    everyone, targets = gather_rows(queries, counts), gather_rows(target_ids, counts)
    if offsets is None:
        local = _slice_scores(everyone, targets, shard, start, absent, chunk, kernel)
    else:
        pairs = _gathered_offsets(offsets, first)
        chunks = torch.stack([  # [chunks, 2, all queries]
            checkpoint(_score_columns, everyone, targets, shard[c:c + chunk], start + c, absent,
                       pairs, use_reentrant=False)
            for c in range(0, len(shard), chunk)])
        local = torch.stack([chunks[:, 0].logsumexp(0), chunks[:, 1].sum(0)])
    ranks = gather_rows(local.unsqueeze(0), [1] * size)
    loss = ranks[:, 0].logsumexp(0) - ranks[:, 1].sum(0)  # every query's cross-entropy
    return loss[first:first + len(queries)].mean()


def _slice_scores(queries: Tensor, targets: Tensor, shard: Tensor, start: int,
                  absent: Tensor | None, chunk: int, kernel: Kernel | str) -> Tensor:
    """``[2, queries]``: each query's log-sum-exp over the slice (the fused kernel, never
    holding more than ``chunk`` items' logits) and its target's logit where it is in it."""
    bias = None if absent is None else shard.new_zeros(len(shard)).masked_fill(
        absent[start:start + len(shard)], NO_ITEM)
    lse = scores_logsumexp(queries, shard, bias, kernel=kernel,
                           chunk_elements=min(CHUNK_ELEMENTS, chunk * max(1, len(queries))))
    column = targets - start
    owned = ((column >= 0) & (column < len(shard))).nonzero().squeeze(1)
    logit = (queries[owned] * shard[column[owned]]).sum(-1, dtype=torch.float32)
    target = lse.new_zeros(len(queries)).index_put((owned,), logit)
    return torch.stack([lse, target])  # fp32 whatever the queries' dtype: ranks combine them


def _score_columns(queries: Tensor, targets: Tensor, columns: Tensor, start: int,
                   absent: Tensor | None, pairs: Offsets | None) -> Tensor:
    """``[2, queries]``: the log-sum-exp of each query's logits over items ``start ..
    start + len(columns) - 1``, and its target's logit where the target is one of them
    (else 0). ``absent``: [V] bool."""
    logits = (queries @ columns.T).float()
    if pairs is not None:
        query, item, value = pairs
        inside = (item >= start) & (item < start + len(columns))
        logits = add_pairs(logits, (query[inside], item[inside], value[inside]),
                           column_offset=start)
    if absent is not None:
        logits = logits.masked_fill(absent[start:start + len(columns)], NO_ITEM)
    column = targets - start
    owned = ((column >= 0) & (column < len(columns))).nonzero().squeeze(1)
    target = torch.zeros_like(logits[:, 0]).index_put((owned,), logits[owned, column[owned]])
    return torch.stack([logits.logsumexp(1), target])


def _gathered_offsets(offsets: Offsets, first: int) -> Offsets:
    """Every rank's (query, item, offset) triples, queries numbered among all ranks'."""
    query, item, value = offsets
    counts = row_counts(len(query))
    return (gather_rows(query + first, counts), gather_rows(item, counts),
            gather_rows(value, counts))
