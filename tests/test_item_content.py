"""Item content: the UniSRec reader, item text/vectors into item shards (no pickle, counts
checked), the towers, and content reaching the member model's item vectors."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from foundation.data.items import iter_items, load_item_content, read_item_text
from foundation.data.sources import SourceConfig, read_table
from foundation.data.writer import BuildConfig, build_shards
from foundation.models.towers import MiniLMTextTower, TextTowerConfig, VectorTower, encode_texts

HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"


def _unisrec(root: Path) -> Path:
    """A 2-user UniSRec directory: user 0 trains on 5 6 7 8, user 1 on 9 5 (item indices)."""
    root.mkdir()
    (root / "D.train.inter").write_text(HEADER + "0\t5 6 7\t8\n0\t5 6\t7\n0\t5\t6\n1\t9\t5\n")
    (root / "D.valid.inter").write_text(HEADER + "0\t5 6 7 8\t10\n1\t9 5\t6\n")
    (root / "D.test.inter").write_text(HEADER + "0\t5 6 7 8 10\t11\n1\t9 5 6\t12\n")
    asins = {f"A{i}": i for i in (5, 6, 7, 8, 9, 10, 11, 12, 13)}  # 13: text, no events
    (root / "D.item2index").write_text("".join(f"{a}\t{i}\n" for a, i in asins.items()))
    (root / "D.text").write_text("item_id:token\ttext:token_seq\n" + "".join(
        f"{a}\tproduct number {i}\n" for a, i in asins.items()))
    (root / "D.user2index").write_text("U0\t0\nU1\t1\n")
    return root


def _item_ids(root: Path) -> list[int]:
    return np.load(root / "item_ids.npy").tolist()


def test_unisrec_directory_keeps_the_files_split_and_its_item_text(tmp_path):
    source = _unisrec(tmp_path / "uni")
    table = read_table(source, "unisrec").to_pydict()
    assert table["member_id"] == [0] * 6 + [1] * 4
    assert table["item_id"] == [5, 6, 7, 8, 10, 11, 9, 5, 6, 12]
    manifest = build_shards(BuildConfig(source=SourceConfig(format="unisrec", path=str(source)),
                                        output=str(tmp_path / "out")))
    assert manifest["split"] == "leave_one_out"  # split=auto: the files' own
    from test_data_import import _items

    raw = {m: items for m, items in _items(tmp_path / "out", "train").items()}
    assert raw == {0: [5, 6, 7, 8], 1: [9, 5]}
    assert _items(tmp_path / "out", "val") == {0: [5, 6, 7, 8, 10], 1: [9, 5, 6]}
    assert _items(tmp_path / "out", "test") == {0: [5, 6, 7, 8, 10, 11], 1: [9, 5, 6, 12]}
    # every item with text is in the catalogue, 13 too (no events: a cold item)
    assert _item_ids(tmp_path / "out") == [-1, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert manifest["items"]["content"] == {"text": {"items": 9}}
    ids, texts = load_item_content(tmp_path / "out", manifest, "text")
    assert ids.tolist() == list(range(1, 10)) and texts[-1] == "product number 13"
    with pytest.raises(ValueError, match="carry their own leave_one_out split"):
        build_shards(BuildConfig(source=SourceConfig(format="unisrec", path=str(source)),
                                 output=str(tmp_path / "o2"), split="member"))
    (source / "D.valid.inter").write_text(HEADER + "0\t5 7\t10\n1\t9 5\t6\n")
    with pytest.raises(ValueError, match="user 0's history is not its training sequence"):
        read_table(source, "unisrec")


def test_item_text_and_vectors_go_into_item_shards_without_pickle(tmp_path):
    (tmp_path / "ev.csv").write_text("member_id,item_id,timestamp\n1,10,1\n1,20,2\n2,30,3\n")
    (tmp_path / "text.tsv").write_text("item_id:token\ttext:token_seq\n10\ta red film\n"
                                       "40\tnot played yet\n")
    from safetensors.numpy import save_file

    save_file({"vectors": np.arange(6, dtype=np.float32).reshape(3, 2),
               "item_ids": np.array([20, 30, 50])}, str(tmp_path / "vec.safetensors"))
    source = SourceConfig(format="csv", path=str(tmp_path / "ev.csv"),
                          item_text_path=str(tmp_path / "text.tsv"),
                          item_vectors_path=str(tmp_path / "vec.safetensors"))
    out = tmp_path / "out"
    manifest = build_shards(BuildConfig(source=source, output=str(out), val_fraction=0,
                                        test_fraction=0))
    assert _item_ids(out) == [-1, 10, 20, 30, 40, 50]
    assert manifest["items"]["content"] == {"text": {"items": 2},
                                            "vectors": {"items": 3, "dim": 2}}
    items = {i["item"]: i for i in iter_items(out, manifest)}
    assert items[1] == {"item": 1, "text": "a red film"} and items[4]["text"] == "not played yet"
    assert items[3]["vectors"].tolist() == [2.0, 3.0] and "text" not in items[3]
    # the same matrix as .npy with a row-id list reads the same
    np.save(tmp_path / "vec.npy", np.arange(6, dtype=np.float32).reshape(3, 2))
    (tmp_path / "ids.txt").write_text("20\n30\n50\n")
    again = build_shards(BuildConfig(source=SourceConfig(
        format="csv", path=str(tmp_path / "ev.csv"), item_text_path=str(tmp_path / "text.tsv"),
        item_vectors_path=str(tmp_path / "vec.npy"),
        item_vector_ids_path=str(tmp_path / "ids.txt")), output=str(tmp_path / "npy"),
        val_fraction=0, test_fraction=0))
    assert again["items"] == manifest["items"]  # byte-identical shards
    # a pickle planted in an item shard is refused, never decoded; a lost item is noticed
    shard = out / manifest["items"]["shards"][0]["path"]
    with tarfile.open(shard, "a") as tar:
        data = b"\x80\x04\x95 pickled"
        info = tarfile.TarInfo("i000000001.pyd")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"unexpected entries \['pyd'\]"):
        list(iter_items(out, manifest))
    manifest["items"]["shards"][0]["samples"] += 1
    build_shards(BuildConfig(source=source, output=str(out), val_fraction=0, test_fraction=0))
    with pytest.raises(ValueError, match="held 5 items, its manifest says 6"):
        list(iter_items(out, manifest))


def test_bad_item_content_files_fail_naming_the_file_and_line(tmp_path):
    (tmp_path / "t.tsv").write_text("1\tok\nx2\tbad id\n")
    with pytest.raises(ValueError, match=r"t\.tsv:2: expected item_id<TAB>text"):
        read_item_text(tmp_path / "t.tsv")
    (tmp_path / "t.tsv").write_text("1\tone\n1\tagain\n")
    with pytest.raises(ValueError, match="item 1 has a second text"):
        read_item_text(tmp_path / "t.tsv")
    from foundation.data.items import read_item_vectors

    np.save(tmp_path / "v.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="item_vector_ids_path"):
        read_item_vectors(tmp_path / "v.npy")
    np.save(tmp_path / "v.npy", np.full((2, 3), np.nan, np.float32))
    (tmp_path / "ids.txt").write_text("1\n2\n")
    with pytest.raises(ValueError, match="NaN or inf"):
        read_item_vectors(tmp_path / "v.npy", tmp_path / "ids.txt")


def test_the_minilm_tower_embeds_meaning_and_its_top_layers_train():
    tower = MiniLMTextTower(TextTowerConfig(max_tokens=32, trainable_layers=1))
    trainable = {n.split(".")[1] for n, p in tower.named_parameters()
                 if p.requires_grad and n.startswith("layers.")}
    assert trainable == {"5"} and not tower.word.weight.requires_grad
    vectors = tower(["a science fiction film about space travel",
                     "a movie set among the stars, with spaceships",
                     "soldering iron tips, 10 pack"])
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2  # meaning, not string overlap
    vectors.sum().backward()
    assert tower.layers[5].query.weight.grad.abs().sum() > 0
    assert tower.layers[4].query.weight.grad is None
    # padding does not change a text's vector (mask-aware attention and pooling)
    alone = tower.eval()(["soldering iron tips, 10 pack"])
    assert torch.allclose(alone[0], vectors[2].detach(), atol=1e-5)
    assert torch.equal(VectorTower(2)(np.ones((1, 2))), torch.ones(1, 2))


def test_a_tuned_text_tower_trains_on_each_batch_and_refreshes_the_catalogue():
    """Top layer trained with the member model: the batch's items are encoded afresh with
    gradients, the rest of the catalogue comes from the last refresh, and a refresh (every
    ``refresh_every`` steps, and before any evaluation) equals the whole tower run again."""
    from test_model import make_batch

    from foundation.models.content import ItemContent, TunedTextAdapter, lower_token_states
    from foundation.models.member import MemberModelConfig
    from foundation.recipes.pretrain_member_fm import NextItemModel, PretrainConfig

    torch.manual_seed(0)
    cfg = TextTowerConfig(max_tokens=16, trainable_layers=1, refresh_every=2)
    tower = MiniLMTextTower(cfg)
    titles = [f"title number {i}, a {'comedy' if i % 2 else 'documentary'}" for i in range(1, 50)]
    ids = np.arange(1, 50)
    tokens, offsets = lower_token_states(tower, ids, titles, 50)
    frozen = torch.zeros(50, 384)
    frozen[1:] = encode_texts(tower.eval(), titles)
    has = torch.arange(50) > 0
    adapter = TunedTextAdapter(frozen, has, 8, 0.0, tower, tokens, offsets)
    assert torch.allclose(adapter.encode(torch.tensor([3, 7])), frozen[[3, 7]], atol=1e-5)
    member = MemberModelConfig(embedding_dim=8, num_layers=1, num_heads=1, max_len=10,
                               item_table="replicated", context_features=False)
    model = NextItemModel(member, PretrainConfig(loss="full_softmax"), torch.ones(50),
                          content=ItemContent({"text": adapter})).train()
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    batch = make_batch([5, 3])
    emb = {k: torch.zeros(len(batch.item), 8) for k in ("action", "gap")}
    top, below = adapter.layers[0].query.weight, tower.layers[4].query.weight
    before, below_before = top.detach().clone(), below.detach().clone()
    model(batch, emb, negatives=torch.arange(1, 50)).backward()
    assert top.grad.abs().sum() > 0 and below.grad is None  # only the top layer trains
    optimiser.step()
    assert not torch.equal(top, before) and torch.equal(below, below_before)
    assert adapter.steps_since_refresh == 2  # not yet refreshed: the catalogue is stale
    assert torch.equal(adapter.vectors, frozen)
    model.eval()(batch, emb, mode="encode")  # evaluation refreshes first
    retuned = torch.zeros(50, 384)
    retuned[1:] = encode_texts(tower.eval(), titles)  # the whole tower, with the trained layer
    assert not torch.allclose(retuned, frozen, atol=1e-3)
    assert torch.allclose(adapter.vectors, retuned, atol=1e-5)
    assert adapter.steps_since_refresh == 0


def test_content_reaches_item_vectors_and_unseen_or_dropped_ids_use_the_fallback():
    from foundation.models.content import ContentAdapter, ItemContent
    from foundation.models.member import MemberModelConfig
    from foundation.recipes.pretrain_member_fm import NextItemModel, PretrainConfig

    torch.manual_seed(0)
    vectors = torch.randn(6, 8)
    has = torch.tensor([False, True, True, True, True, False])  # item 5: no content
    content = ItemContent({"text": ContentAdapter(vectors, has, dim=4, dropout=0.0)})
    counts = torch.tensor([0, 3, 2, 1, 0, 5.0])  # item 4 never seen in training
    cfg = MemberModelConfig(embedding_dim=4, num_layers=1, num_heads=1, item_table="replicated",
                            id_dropout=0.5)
    model = NextItemModel(cfg, PretrainConfig(loss="full_softmax"), counts, content=content)
    items = torch.arange(6)
    ids = model.item_table(items)
    out = model.eval().item_vectors(items, None, model.uses_id(items))
    adapted = content(items)
    assert torch.allclose(out[1:4], ids[1:4] + adapted[1:4])
    assert torch.allclose(out[4], model.fallback + adapted[4])  # cold: fallback + content
    assert torch.allclose(out[5], ids[5]) and adapted[5].abs().sum() == 0  # no content: ID only
    # training: about half the ID rows of seen items are swapped for the fallback
    many = torch.full((4000,), 1)
    dropped = (model.train().item_vectors(many, None, model.uses_id(many)) - adapted[1]).sub(model.fallback).abs()
    share = (dropped.sum(1) < 1e-6).float().mean().item()
    assert 0.45 < share < 0.55
    # the adapter's outputs start at the scale of ID rows, centred on the catalogue
    assert 0.2 < adapted[1:5].norm(dim=1).mean().item() < 5


def test_frozen_content_is_encoded_once_per_run_and_cached(tmp_path, monkeypatch):
    from foundation.models import content as content_module
    from foundation.models.towers import Modality

    (tmp_path / "ev.csv").write_text("member_id,item_id,timestamp\n1,10,1\n1,20,2\n")
    from safetensors.numpy import save_file

    save_file({"vectors": np.eye(3, dtype=np.float32), "item_ids": np.array([10, 20, 30])},
              str(tmp_path / "vec.safetensors"))
    manifest = build_shards(BuildConfig(
        source=SourceConfig(format="csv", path=str(tmp_path / "ev.csv"),
                            item_vectors_path=str(tmp_path / "vec.safetensors")),
        output=str(tmp_path / "out"), val_fraction=0, test_fraction=0))
    args = (Modality.vectors, str(tmp_path / "out"), manifest, 4, TextTowerConfig(),
            tmp_path / "run" / "content")
    vectors, has = content_module.content_vectors(*args)
    assert vectors.tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert has.tolist() == [False, True, True, True]
    monkeypatch.setattr(content_module, "load_item_content", None)  # must not be read again
    again, _ = content_module.content_vectors(*args)
    assert torch.equal(again, vectors)
    # A fine-tune warm-started from that run reads its cache instead of encoding, and keeps
    # a copy; a cache of other content (another fingerprint) is not used.
    tuned = tmp_path / "finetune" / "content"
    reused, _ = content_module.content_vectors(*args[:5], tuned, None, args[5])
    assert torch.equal(reused, vectors) and (tuned / "vectors.safetensors").is_file()
    monkeypatch.setattr(content_module, "_fingerprint", lambda *a: "another build")
    with pytest.raises(TypeError):  # a miss encodes, which reads the (removed) content
        content_module.content_vectors(*args[:5], tmp_path / "x", None, args[5])
    with pytest.raises(ValueError, match="has no item text"):
        content_module.content_vectors(Modality.text, *args[1:])


def test_items_training_never_shows_are_not_negatives_of_a_content_model():
    """Cold items are always absent from training: as negatives the model would learn to
    bury exactly them (their content included). Changing them leaves the loss unchanged."""
    from test_model import make_batch

    from foundation.models.content import ContentAdapter, ItemContent
    from foundation.models.member import MemberModelConfig
    from foundation.recipes.pretrain_member_fm import NextItemModel, PretrainConfig

    torch.manual_seed(0)
    batch = make_batch([5, 4])  # items 1..49
    counts = torch.ones(50)
    counts[40:] = 0  # never in training
    batch.item = batch.item.clamp(max=39)
    cfg = MemberModelConfig(embedding_dim=8, num_layers=1, num_heads=1, item_table="replicated",
                            context_features=False)
    vectors = torch.randn(50, 6)
    for loss in ("full_softmax", "sampled_softmax"):
        content = ItemContent({"text": ContentAdapter(vectors.clone(), torch.ones(50).bool(), 8,
                                                      0.0)})
        model = NextItemModel(cfg, PretrainConfig(loss=loss), counts, content=content).eval()
        emb = {k: torch.zeros(len(batch.item), 8) for k in ("action", "gap")}
        before = model(batch, emb, negatives=torch.arange(1, 50))
        content.adapters["text"].vectors[40:] += 10.0  # change only the unseen items
        after = model(batch, emb, negatives=torch.arange(1, 50))
        assert torch.allclose(before, after), loss
        content.adapters["text"].vectors[5] += 10.0  # a seen item does count
        assert not torch.allclose(after, model(batch, emb, negatives=torch.arange(1, 50)))


def test_content_match_scores_items_by_the_recency_weighted_content_of_the_history():
    """With content_match, a member's score of an item gains q · u: q pools the units
    (centred, unit-length frozen vectors) of the events up to each position by learned
    recency weights; u is the item's unit, weighted by whether the item is scored with its
    ID. Training moves the cold-item weight (dropped IDs teach it)."""
    from test_model import make_batch

    from foundation.models.content import ContentAdapter, ItemContent
    from foundation.models.member import MemberModelConfig
    from foundation.recipes.pretrain_member_fm import NextItemModel, PretrainConfig

    torch.manual_seed(0)
    batch = make_batch([5, 3])
    counts = torch.ones(50)
    counts[45:] = 0  # never in training
    vectors = torch.randn(50, 6)
    content = ItemContent({"text": ContentAdapter(vectors, torch.ones(50).bool(), 8, 0.0)})
    cfg = MemberModelConfig(embedding_dim=8, num_layers=1, num_heads=1, item_table="replicated",
                            context_features=False, content_match=True, id_dropout=0.5,
                            max_len=10)
    model = NextItemModel(cfg, PretrainConfig(loss="full_softmax"), counts, content=content)
    match = model.match
    with torch.no_grad():
        match.log_recency.copy_(torch.randn(10))
        match.log_item_weight.copy_(torch.tensor([3.0, 0.5]).log())
    units = torch.nn.functional.normalize(vectors - vectors.mean(0), dim=-1)
    assert torch.allclose(match.unit, units, atol=1e-6)
    emb = {k: torch.zeros(len(batch.item), 8) for k in ("action", "gap")}
    members = model.eval()(batch, emb, mode="encode")
    items = model(None, {}, torch.arange(50), mode="items")
    assert members.shape == (2, 8 + 6) and items.shape == (50, 8 + 6)
    last = batch.item[5:8]  # the second history: its newest event weighs recency[0]
    pooled = (match.recency[[2, 1, 0]].unsqueeze(1) * units[last]).sum(0)
    assert torch.allclose(members[1, 8:], pooled, atol=1e-5)
    assert torch.allclose(items[10, 8:], 0.5 * units[10]) and torch.allclose(
        items[47, 8:], 3.0 * units[47])  # seen with its ID; never seen
    assert torch.allclose(model.new_item_vectors(torch.tensor([10]))[0, 8:], 3.0 * units[10])
    match.log_cold_scale.fill_(math.log(2.0))  # calibrated on validation: serving only
    items = model(None, {}, torch.arange(50), mode="items")
    assert torch.allclose(items[47, 8:], 6.0 * units[47]) and torch.allclose(
        items[10, 8:], 0.5 * units[10])
    assert torch.allclose(match.serving_item_weight, torch.tensor([6.0, 0.5]))
    model.train()(batch, emb, negatives=torch.arange(1, 50)).backward()
    assert torch.allclose(match.items(torch.tensor([47]), torch.tensor([False])),
                          3.0 * units[47:48])  # training keeps the learned weight
    assert match.log_item_weight.grad[0] != 0 and match.log_recency.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="model.item_content"):
        NextItemModel(cfg, PretrainConfig(), counts)
    with pytest.raises(ValueError, match="model.cold_budget=10"):
        NextItemModel(dataclasses.replace(cfg, cold_budget=10), PretrainConfig(), counts,
                      content=content)


def test_the_cold_item_scale_serves_cold_users_within_the_warm_users_budget():
    from foundation.metrics.calibration import COLD_SCALES, choose_cold_scale

    scales = np.array([0.5, 1.0, 2.0, 4.0])
    is_cold = np.array([False, False, False, True])
    ndcg = np.array([[1.0, 0.96, 0.8, 0.5]] * 3 + [[0.0, 0.2, 0.6, 1.0]])  # users × scales
    assert choose_cold_scale(ndcg, is_cold, scales, budget=0.05) == 1  # warm keeps ≥ 0.95
    assert choose_cold_scale(ndcg, is_cold, scales, budget=0.25) == 2
    assert choose_cold_scale(ndcg, is_cold, scales, budget=0.6) == 3
    assert choose_cold_scale(ndcg, np.zeros(4, bool), scales, budget=0.6) == 1  # nothing to fit
    # against a reference run's warm NDCG (e.g. the ID-only incumbent) instead of the best
    assert choose_cold_scale(ndcg, is_cold, scales, budget=0.1, reference=0.85) == 2
    assert choose_cold_scale(ndcg, is_cold, scales, budget=0.1, reference=2.0) == 0  # least harm
    assert COLD_SCALES.min() < 1 < COLD_SCALES.max() and (COLD_SCALES == 1).sum() == 1


def test_a_runs_best_validation_is_read_from_its_log(tmp_path):
    from foundation.tracking import best_validation

    with pytest.raises(FileNotFoundError, match="finished training run"):
        best_validation(tmp_path)
    rows = [{"step": 10, "loss": 3.0}, {"step": 10, "split": "val", "warm/ndcg@10": 0.2},
            {"step": 20, "split": "val", "warm/ndcg@10": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert best_validation(tmp_path)["step"] == 20  # no best.json: the last validation
    (tmp_path / "best.json").write_text(json.dumps({"step": 10}))
    assert best_validation(tmp_path)["warm/ndcg@10"] == 0.2
