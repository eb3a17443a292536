"""The member model's building blocks: exact causality and correct losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from foundation.data.batch import SequenceBatch
from foundation.models.losses import full_softmax_loss, next_item_pairs, sampled_softmax_loss
from foundation.models.member import (
    DEFAULT_SCHEMA,
    EventEncoder,
    MemberModelConfig,
    SparseArch,
    pad_jagged,
    sparse_features,
)
from foundation.tasks import take_events


def make_batch(lengths, num_items=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    n = int(lengths.sum())

    def rand(high):
        return torch.randint(1, high, (n,), generator=g)

    return SequenceBatch(sample_ids=torch.arange(len(lengths)), lengths=lengths, item=rand(num_items),
                         timestamp=torch.arange(n),
                         events={k: rand(size) for k, size in DEFAULT_SCHEMA.sizes.items()})


def encode(encoder, table, batch):
    return encoder(table(sparse_features(batch)), batch.lengths, timestamps=batch.timestamp)


ATTENTION = pytest.mark.parametrize("attention", ["softmax", "pointwise"])


@ATTENTION
def test_no_position_sees_its_target_or_the_future(attention):
    torch.manual_seed(0)
    cfg = MemberModelConfig(embedding_dim=16, num_layers=2, num_heads=2, dropout=0.0, max_len=12,
                            attention=attention)
    encoder, table = EventEncoder(cfg).eval(), SparseArch(50, 16)
    batch = make_batch([7, 4, 9])
    states, mask = encode(encoder, table, batch)
    # Change the events of row 2 from position t on; states before t must not move.
    for t in (1, 4, 8):
        changed = make_batch([7, 4, 9], seed=1)
        changed.timestamp = changed.timestamp * 7  # later events happen at other times too
        for name in ("item", "timestamp", *changed.events):
            new, old = changed.jagged(name), batch.jagged(name).clone()
            old[11 + t:] = new[11 + t:]
            new.copy_(old)
        states2, _ = encode(encoder, table, changed)
        assert torch.allclose(states[2, :t], states2[2, :t], atol=1e-6)
        assert not torch.allclose(states[2, t], states2[2, t], atol=1e-4)
        assert torch.equal(states[:2], states2[:2])  # other rows untouched


@ATTENTION
def test_states_do_not_depend_on_batch_padding(attention):
    torch.manual_seed(0)
    cfg = MemberModelConfig(embedding_dim=16, num_layers=1, num_heads=2, dropout=0.0, max_len=12,
                            attention=attention)
    encoder, table = EventEncoder(cfg).eval(), SparseArch(50, 16)
    batch = make_batch([3, 9])
    alone = SequenceBatch(**{**batch.__dict__, "lengths": torch.tensor([3]),
                             "item": batch.item[:3], "timestamp": batch.timestamp[:3],
                             "events": {k: v[:3] for k, v in batch.events.items()},
                             "sample_ids": batch.sample_ids[:1]})
    padded_states, _ = encode(encoder, table, batch)
    alone_states, _ = encode(encoder, table, alone)
    assert torch.allclose(padded_states[0, :3], alone_states[0], atol=1e-5)


@pytest.mark.parametrize(("attention", "kernel"), [("pointwise", "pytorch"),
                                                   ("pointwise", "triton"), ("softmax", "auto")])
def test_layers_on_jagged_rows_equal_the_padded_program(attention, kernel):
    """Training runs the layers on jagged rows (HSTU's attention through foundation.kernels,
    Triton here in its CPU interpreter; softmax attention padded for the attention alone); the
    exported program runs them padded. Same states and gradients."""
    torch.manual_seed(0)
    cfg = MemberModelConfig(embedding_dim=16, num_layers=2, num_heads=2, dropout=0.0,
                            max_len=12, attention=attention, kernel=kernel)
    encoder, table = EventEncoder(cfg).eval(), SparseArch(50, 16)
    batch = make_batch([3, 0, 12, 1, 7])
    batch.timestamp = torch.arange(int(batch.lengths.sum())) * 3600  # one bucket per hour
    emb = table(sparse_features(batch))
    jagged, mask = encoder(emb, batch.lengths, newest_is_target=True, timestamps=batch.timestamp)
    tokens = sum(emb[k] * encoder.token_scale(k) for k in encoder.token_features)
    padded = encoder.encode_padded(pad_jagged(tokens, batch.lengths)[0], mask, skip_newest=1,
                                   timestamps=pad_jagged(batch.timestamp, batch.lengths)[0])
    torch.testing.assert_close(jagged[mask], padded[mask], atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(jagged[mask])
    params = [p for p in encoder.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad((jagged[mask] * weights).sum(), params),
                    torch.autograd.grad((padded[mask] * weights).sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_next_item_pairs_point_at_the_following_event():
    lengths = torch.tensor([3, 1, 2])
    values = torch.arange(6)  # events 0..5 laid out jagged
    padded, mask = pad_jagged(values, lengths)
    query, target = next_item_pairs(padded.unsqueeze(-1).float(), mask, lengths)
    assert padded.flatten()[query].tolist() == [0, 1, 4]  # queries: all but each row's last
    assert values[target].tolist() == [1, 2, 5]  # targets: the event right after


def test_sampled_softmax_with_all_items_equals_full_softmax():
    torch.manual_seed(0)
    table = torch.randn(30, 8)
    queries, targets = torch.randn(5, 8), torch.tensor([3, 7, 7, 1, 29])
    everything = torch.arange(1, 30)  # item 0 is padding
    loss = sampled_softmax_loss(queries, targets, table[targets], everything, table[everything],
                                log_item_prob=None, in_batch=False)
    full = F.cross_entropy(queries @ table[1:].T, targets - 1)
    assert torch.allclose(loss, full, atol=1e-6)
    assert torch.allclose(full_softmax_loss(queries, targets, table[everything]), full, atol=1e-6)
    absent = torch.zeros(30, dtype=torch.bool)
    absent[[2, 5, 11]] = True  # left out of the softmax (never targets)
    logits = (queries @ table[1:].T).masked_fill(absent[1:], float("-inf"))
    catalogue = table[everything].requires_grad_()
    left_out = full_softmax_loss(queries, targets, catalogue, absent)
    assert torch.allclose(left_out, F.cross_entropy(logits, targets - 1), atol=1e-6)
    assert (torch.autograd.grad(left_out, catalogue)[0][absent[1:]] == 0).all()


def test_logq_correction_and_accidental_hits():
    torch.manual_seed(0)
    table = torch.randn(10, 4)
    queries, targets = torch.randn(3, 4), torch.tensor([2, 2, 5])
    negatives = torch.tensor([2, 6])  # item 2 is an accidental hit for rows 0 and 1
    log_p = torch.log(torch.full((10,), 0.1))
    loss = sampled_softmax_loss(queries, targets, table[targets], negatives, table[negatives],
                                log_item_prob=log_p, in_batch=True)
    # Hand computation: log q = log(expected proposals) per candidate, same for all here.
    rate = torch.log(torch.tensor(2 / 9 + 3 * 0.1))
    cand = torch.cat([targets, negatives])
    expected = []
    for i in range(3):
        pos = queries[i] @ table[targets[i]] - rate
        others = [queries[i] @ table[c] - rate for j, c in enumerate(cand) if c != targets[i]]
        expected.append(-pos + torch.logsumexp(torch.stack([pos, *others]), 0))
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-5)


def test_logq_counts_each_sampler_popularity_drawn_and_shared_negatives():
    torch.manual_seed(0)
    table = torch.randn(10, 4)
    queries, targets = torch.randn(2, 4), torch.tensor([3, 5])
    shared = torch.tensor([7])  # another rank's target
    negatives = torch.tensor([6, 8, 1])  # 2 uniform, then 1 drawn by popularity
    p = torch.softmax(torch.randn(10), 0)
    loss = sampled_softmax_loss(queries, targets, table[targets], negatives, table[negatives],
                                log_item_prob=p.log(), popular=1,
                                shared=(shared, table[shared]))
    # Expected proposals of item j: 2 uniform of 9 items, and 1 popularity draw plus 3 in-batch
    # targets (2 own, 1 shared), each at p(j).
    log_q = torch.log(2 / 9 + 4 * p)
    cand = torch.cat([targets, shared, negatives])
    expected = []
    for i in range(2):
        pos = queries[i] @ table[targets[i]] - log_q[targets[i]]
        others = [queries[i] @ table[c] - log_q[c] for c in cand if c != targets[i]]
        expected.append(-pos + torch.logsumexp(torch.stack([pos, *others]), 0))
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-5)


def test_item_attributes_pool_each_items_attribute_embeddings():
    from foundation.models.member import ItemAttributes

    # item 1: attributes {1, 2}; item 2: none; item 3: {3}
    values, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 0, 2, 2, 3])
    attributes = ItemAttributes(values, offsets, num_attributes=4, dim=3)
    table = attributes.table.weight.detach()
    out = attributes(torch.tensor([3, 1, 2, 1]))
    assert torch.allclose(out[0], table[3])
    assert torch.allclose(out[1], (table[1] + table[2]) / 2) and torch.equal(out[1], out[3])
    assert torch.equal(out[2], torch.zeros(3))  # no side information: adds nothing
    out.sum().backward()
    assert attributes.table.weight.grad[[1, 2, 3]].abs().sum() > 0


@ATTENTION
def test_the_last_training_query_is_encoded_exactly_as_when_serving(attention):
    """In next-item training the newest event is only a target, so positions count back from
    the event before it: the state that predicts the newest event is the state a server
    computes for the history without it (the recency-0 slot is trained, as in SASRec)."""
    torch.manual_seed(0)
    cfg = MemberModelConfig(embedding_dim=16, num_layers=2, num_heads=2, dropout=0.0, max_len=12,
                            attention=attention)
    encoder, table = EventEncoder(cfg).eval(), SparseArch(50, 16)
    batch = make_batch([6, 3])
    states, _ = encoder(table(sparse_features(batch)), batch.lengths, newest_is_target=True,
                        timestamps=batch.timestamp)
    history = take_events(batch, torch.tensor([True] * 5 + [False] + [True] * 2 + [False]))
    served, mask = encode(encoder, table, history)
    assert torch.allclose(states[0, 4], served[0, 4], atol=1e-5)
    assert torch.allclose(states[1, 1], served[1, 1], atol=1e-5)
    unshifted, _ = encode(encoder, table, batch)
    assert not torch.allclose(unshifted[0, 4], served[0, 4], atol=1e-3)


def test_a_replicated_item_table_lives_in_the_dense_model_not_the_sharded_arch():
    from foundation.compose import compose
    from foundation.recipes.pretrain_member_fm import NextItemModel, PretrainConfig

    cfg = MemberModelConfig(embedding_dim=16, num_layers=1, num_heads=2, item_table="replicated")
    model = NextItemModel(cfg, PretrainConfig(loss="full_softmax"), torch.zeros(50))
    sparse = SparseArch(50, 16, with_items=False)
    assert model.item_table.weight.shape == (50, 16)
    assert "item_table" not in str(list(sparse.state_dict()))
    batch = make_batch([4, 3])
    emb = sparse(sparse_features(batch, with_items=False))
    assert set(emb) == {"action", "gap", "hour", "device"}
    loss = model(batch, emb, negatives=torch.arange(1, 50))
    loss.backward()
    assert model.item_table.weight.grad[1:].abs().sum(1).min() > 0  # full softmax: every item
    import pytest

    from foundation.config import ConfigError
    from foundation.models.member import sharded_items

    with pytest.raises(ConfigError, match=r"'mirrored', expected one of \[sharded, replicated\]"):
        compose("train", ["recipe=pretrain_member_fm", "data.path=x", "model.item_table=mirrored"])
    with pytest.raises(ValueError, match="model.item_table='mirrored' is unknown"):
        sharded_items(MemberModelConfig(item_table="mirrored"))  # built in code


def test_pointwise_attention_biases_by_relative_position_and_time():
    """HSTU layers: the time bias reads how long before the query each past event happened
    (shifting every timestamp changes nothing, spreading them does); the position bias reads
    the distance between events; both are learnt, and unknown attention kinds are refused."""
    torch.manual_seed(0)
    cfg = MemberModelConfig(embedding_dim=16, num_layers=1, num_heads=2, dropout=0.0, max_len=12,
                            attention="pointwise")
    encoder, table = EventEncoder(cfg).eval(), SparseArch(50, 16)
    for layer in encoder.layers:  # zero at initialisation: give them something to say
        torch.nn.init.normal_(layer.time_bias.weight)
        torch.nn.init.normal_(layer.position_bias.weight)
    batch = make_batch([6, 4])
    batch.timestamp = batch.timestamp * 3600
    states, _ = encode(encoder, table, batch)
    shifted = SequenceBatch(**{**batch.__dict__, "timestamp": batch.timestamp + 10**9})
    assert torch.allclose(states, encode(encoder, table, shifted)[0], atol=1e-6)
    spread = SequenceBatch(**{**batch.__dict__, "timestamp": batch.timestamp * 30})
    assert not torch.allclose(states[:, 1:], encode(encoder, table, spread)[0][:, 1:], atol=1e-3)
    loss = encode(encoder.train(), table, batch)[0].square().sum()
    loss.backward()
    layer = encoder.layers[0]
    assert layer.time_bias.weight.grad.abs().sum() > 0
    assert layer.position_bias.weight.grad[:6].abs().sum(1).min() > 0  # every distance seen
    with pytest.raises(ValueError, match="model.attention='linear' is unknown"):
        EventEncoder(MemberModelConfig(attention="linear"))


def test_cosine_similarity_scores_unit_vectors_and_divides_the_loss_by_the_temperature():
    from foundation.recipes.pretrain_member_fm import NextItemModel, PretrainConfig

    torch.manual_seed(0)
    cfg = MemberModelConfig(embedding_dim=16, num_layers=1, num_heads=2, item_table="replicated")
    batch = make_batch([5, 3])
    sparse = SparseArch(50, 16, with_items=False)
    emb = sparse(sparse_features(batch, with_items=False))
    losses = {}
    for similarity, temperature in (("dot", 1.0), ("cosine", 1.0), ("cosine", 0.05)):
        torch.manual_seed(1)
        recipe = PretrainConfig(loss="full_softmax", similarity=similarity,
                                temperature=temperature)
        model = NextItemModel(cfg, recipe, torch.ones(50)).eval()
        losses[(similarity, temperature)] = model(batch, emb, negatives=torch.arange(1, 50)).item()
        members = model(batch, emb, mode="encode")
        items = model(None, {}, torch.arange(50), mode="items")
        tokens = model(None, {}, torch.arange(50), mode="tokens")
        unit = similarity == "cosine"
        assert torch.allclose(members.norm(dim=1), torch.ones(2), atol=1e-5) == unit
        assert torch.allclose(items[1:].norm(dim=1), torch.ones(49), atol=1e-5) == unit
        assert torch.allclose(tokens, model.item_table.weight)  # inputs are never normalised
    # cosines lie in [-1, 1]: at temperature 1 the softmax is nearly flat, a low one sharpens it
    assert abs(losses[("cosine", 1.0)] - math.log(49)) < 0.1
    assert losses[("cosine", 0.05)] != pytest.approx(losses[("cosine", 1.0)], abs=0.1)


def test_the_history_bias_offsets_each_item_by_the_age_of_its_events():
    from foundation.models.history import HistoryBias, add_pairs

    bias = HistoryBias(max_len=3)
    with torch.no_grad():
        bias.units.copy_(torch.tensor([-1.0, -2.0, -4.0]) / bias.UNIT)
    items = torch.tensor([[3, 4, 3, 7, 5], [2, 5, 0, 0, 0]])
    served = add_pairs(torch.zeros(2, 8), bias.newest(items, items > 0))
    # row 0: item 3 at ages 4 and 2 (ages past max_len weigh as the oldest), 4 at 3, 7 at 1
    assert served[0].tolist() == [0, 0, 0, -8, -4, -1, 0, -2]
    assert served[1].tolist() == [0, 0, -2, 0, 0, -1, 0, 0]
    # in training, a query at position t sees only the events up to t
    query, item, value = bias.pairs(items, items > 0, torch.tensor([0]), torch.tensor([1]))
    assert item.tolist() == [3, 4] and value.tolist() == [-2.0, -1.0]

    torch.manual_seed(0)
    table = torch.randn(9, 4)
    queries, targets = torch.randn(2, 4), torch.tensor([3, 6])
    offsets = bias.newest(items, items > 0)
    everything = torch.arange(1, 9)
    expected = F.cross_entropy(add_pairs(queries @ table.T, offsets)[:, 1:], targets - 1)
    full = full_softmax_loss(queries, targets, table[everything], offsets=offsets)
    sampled = sampled_softmax_loss(queries, targets, table[targets], everything,
                                   table[everything], log_item_prob=None, in_batch=True,
                                   offsets=offsets)  # in-batch: item 3 and 6 twice
    assert torch.allclose(full, expected, atol=1e-6)
    in_batch = torch.cat([targets, everything])
    logits = add_pairs(queries @ table.T, offsets)
    dense = torch.cat([logits.gather(1, targets[:, None]), logits[:, in_batch].masked_fill(
        in_batch == targets[:, None], float("-inf"))], 1)
    assert torch.allclose(sampled, F.cross_entropy(dense, torch.zeros(2, dtype=torch.long)),
                          atol=1e-6)
    full.backward()
    assert bias.units.grad.abs().sum() > 0


def test_the_history_bias_learns_that_members_do_not_repeat():
    """Histories of distinct items: the trained bias ranks what was just seen lower."""
    from foundation.recipes.pretrain_member_fm import NextItemModel, PretrainConfig

    torch.manual_seed(0)
    cfg = MemberModelConfig(embedding_dim=16, num_layers=1, num_heads=2, item_table="replicated",
                            context_features=False, history_bias=True, max_len=8)
    model = NextItemModel(cfg, PretrainConfig(loss="full_softmax"), torch.ones(40)).train()
    sparse = SparseArch(40, 16, with_items=False)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(60):
        g = torch.Generator().manual_seed(step)
        item = torch.cat([torch.randperm(39, generator=g)[:6] + 1 for _ in range(16)])
        batch = SequenceBatch(sample_ids=torch.arange(16), lengths=torch.full((16,), 6),
                              item=item, timestamp=torch.arange(96),
                              events={k: torch.ones(96, dtype=torch.long)
                                      for k in DEFAULT_SCHEMA.sizes})
        loss = model(batch, sparse(sparse_features(batch, with_items=False)),
                     negatives=torch.arange(1, 40))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert (model.history.weight[:5] < -1.0).all()  # a seen item loses e-fold odds or more


def test_a_candidate_scorer_reads_each_candidates_content_closeness_to_its_own_history():
    from foundation.models.candidates import TargetAwareScorer, content_affinity
    from foundation.models.content import ContentAdapter, ItemContent

    torch.manual_seed(0)
    vectors = torch.randn(50, 6)
    content = ItemContent({"text": ContentAdapter(vectors, torch.ones(50).bool(), 8, 0.0)})
    cfg = MemberModelConfig(embedding_dim=8, num_layers=1, num_heads=2, max_len=10)
    scorer = TargetAwareScorer(cfg, hidden=16, outputs=2, content=content).eval()
    batch = make_batch([3, 5])
    batch.candidates, batch.candidate_lengths = torch.tensor([4, 9, 17]), torch.tensor([1, 2])
    history, mask = pad_jagged(scorer.units[batch.item], batch.lengths)
    candidates, placed = pad_jagged(scorer.units[batch.candidates], batch.candidate_lengths)
    got = content_affinity(history, mask, candidates)[placed]
    unit = F.normalize(vectors - vectors.mean(0), dim=-1)
    for k, (row, start) in enumerate([(0, 0), (1, 3), (1, 3)]):
        history = batch.item[start:start + int(batch.lengths[row])]
        cosines = unit[history] @ unit[batch.candidates[k]]
        assert torch.allclose(got[k], torch.stack([cosines.mean(), cosines.max()]), atol=1e-5)
    emb = {"item": torch.randn(8, 8), "candidate": torch.randn(3, 8),
           **{k: torch.randn(8, 8) for k in batch.events}}
    assert scorer.logits(batch, emb).shape == (3, 2)


@ATTENTION
def test_the_exported_candidate_program_scores_padded_rows_as_the_model_scores_jagged_ones(attention):
    from foundation.models.candidates import CandidateScorerProgram, TargetAwareScorer
    from foundation.models.content import ContentAdapter, ItemContent

    torch.manual_seed(0)
    content = ItemContent({"text": ContentAdapter(torch.randn(50, 6), torch.ones(50).bool(), 8,
                                                  0.0)})
    cfg = MemberModelConfig(embedding_dim=8, num_layers=1, num_heads=2, max_len=10,
                            attention=attention)
    scorer = TargetAwareScorer(cfg, hidden=16, outputs=2, content=content).eval()
    batch = make_batch([3, 5])
    batch.candidates, batch.candidate_lengths = torch.tensor([4, 9, 17, 2]), torch.tensor([1, 3])
    emb = {"item": torch.randn(8, 8), "candidate": torch.randn(4, 8),
           **{k: torch.randn(8, 8) for k in batch.events}}
    expected = scorer.logits(batch, emb)
    program = CandidateScorerProgram(scorer)
    item_tokens = scorer.with_item_parts(batch.item, emb["item"]) * cfg.item_scale
    tokens = pad_jagged(item_tokens + sum(emb[k] for k in scorer.encoder.token_features[1:]),
                        batch.lengths)[0]
    candidates, placed = pad_jagged(scorer.with_item_parts(batch.candidates, emb["candidate"]),
                                    batch.candidate_lengths)
    inputs = {"tokens": tokens, "lengths": batch.lengths,
              "timestamps": pad_jagged(batch.timestamp, batch.lengths)[0],
              "candidates": candidates,
              "history_units": pad_jagged(scorer.units[batch.item], batch.lengths)[0],
              "candidate_units": pad_jagged(scorer.units[batch.candidates],
                                            batch.candidate_lengths)[0]}
    with torch.no_grad():
        got = program(*(inputs[name] for name in program.input_names))[placed]
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_exported_search_program_reads_query_text_as_the_model_does():
    """Query n-grams + the query's text tower vector (through the titles' text adapter) +
    the member's state: the program's padded inputs give the training path's vectors."""
    from foundation.models.content import ContentAdapter, ItemContent
    from foundation.recipes.finetune_search import (
        PersonalisedSearch,
        SearchConfig,
        SearchQueryProgram,
        ngram_rows,
    )

    torch.manual_seed(0)
    content = ItemContent({"text": ContentAdapter(torch.randn(50, 6), torch.ones(50).bool(), 8,
                                                  0.0)})
    cfg = MemberModelConfig(embedding_dim=8, num_layers=1, num_heads=2, max_len=10)
    model = PersonalisedSearch(cfg, SearchConfig(ngram_buckets=64), torch.ones(50), None,
                               ("item", *DEFAULT_SCHEMA.token_features(cfg.context_features)),
                               content=content, reads_query_text=True)
    model.member_head.weight.data.fill_(0.5)  # a taste that counts
    model.eval()
    batch = make_batch([3, 5])
    batch.queries, batch.query_lengths = ["space wizard", "sapce", "the chef"], torch.tensor([1, 2])
    emb = {"item": torch.randn(8, 8), **{k: torch.randn(8, 8) for k in batch.events}}
    grams, text = ngram_rows(batch.queries, 64), torch.randn(3, 6)
    with torch.no_grad():
        expected = model(batch, emb, grams, mode="queries", query_text=text)
        without_text = model(batch, emb, grams, mode="queries", query_text=text * 0 +
                             content.adapters["text"].center)
    assert not torch.allclose(expected, without_text)  # the text tower's vector counts
    program = SearchQueryProgram(model)
    assert program.input_names[:2] == ["query_grams", "query_text"]
    item_tokens = model.with_item_parts(batch.item, emb["item"]) * cfg.item_scale
    tokens = pad_jagged(item_tokens + sum(emb[k] for k in model.encoder.token_features[1:]),
                        batch.lengths)[0]
    rows = torch.repeat_interleave(torch.arange(2), batch.query_lengths)
    inputs = {"query_grams": grams, "query_text": text, "tokens": tokens[rows],
              "lengths": batch.lengths[rows],
              "timestamps": pad_jagged(batch.timestamp, batch.lengths)[0][rows]}
    with torch.no_grad():
        got = program(*(inputs[name] for name in program.input_names))
    assert torch.allclose(got, expected, atol=1e-5)
