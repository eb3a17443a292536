"""Cold start on the synthetic world: a fifth of the titles never appear in training, only
their titles do. A member model reading item text (and scoring by content match) recommends
them; an ID-only model cannot."""

from __future__ import annotations

import json

import pytest
from conftest import FAST, TEST_WORLD, foundation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cold_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("cold_world")
    foundation("data", "synth", f"output={out}", *TEST_WORLD, "world.cold_items=0.2",
               "world.cold_val_items=0.1", "progress=false")
    return out


# A model of ID rows and item text, which scores cold titles by their text.
CONTENT = ["model.item_content=[text]", "model.id_dropout=0.3", "model.content_match=true"]


@pytest.fixture(scope="module")
def runs(cold_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("cold_runs")
    common = [f"data.path={cold_world}", "trainer.eval_every=0", "trainer.eval_batches=2",
              "trainer.final_eval_split=test", *FAST]
    foundation("train", f"run_dir={root / 'ids'}", "trainer.max_steps=60", *common)
    foundation("train", "--nproc=2", f"run_dir={root / 'text'}", "trainer.max_steps=150",
               *CONTENT, f"model.cold_reference={root / 'ids'}", *common)
    return root


def _report(run) -> dict:
    return json.loads((run / "eval.json").read_text())


def test_cold_items_stay_in_the_catalogue_but_out_of_training(cold_world):
    import numpy as np

    from foundation.data.loader import build_loader

    manifest = json.loads((cold_world / "manifest.json").read_text())
    cold = np.load(cold_world / "cold_items.npy")
    assert manifest["cold_items"]["count"] == len(cold) == 200
    counts = np.load(cold_world / "item_counts.npy")
    assert counts[cold].sum() == 0 and counts.sum() > 0  # never trained on
    val_cold = np.load(cold_world / "cold_val_items.npy")  # validation's own cold targets
    assert manifest["cold_val_items"]["count"] == len(val_cold) == 100
    assert counts[val_cold].sum() == 0 and not set(val_cold) & set(cold)
    val = np.concatenate([b.item.numpy() for b in build_loader(
        str(cold_world), "val", batch_size=64, max_len=200)])
    assert np.isin(val_cold, val).any() and not np.isin(cold, val).any()
    assert manifest["items"]["content"]["text"]["items"] == 1000  # every title has text


def test_a_content_model_recommends_cold_items_from_their_text(runs):
    text, ids = _report(runs / "text"), _report(runs / "ids")
    cold = text["groups"]["cold"]
    assert cold["metrics"]["users"] >= 20 and set(text["groups"]) == {"cold", "warm"}
    assert cold["baselines"]["most_popular"]["ndcg@10"] < 0.01  # nothing to count
    # from text alone: far above what popularity or an ID-only model can do for new titles
    assert cold["metrics"]["hr@10"] > 0.15, cold
    assert cold["metrics"]["ndcg@10"] > 3 * ids["groups"]["cold"]["metrics"]["ndcg@10"] + 0.02
    assert "content_knn" in cold["baselines"]  # the text baseline of cold-start studies
    warm = text["groups"]["warm"]["metrics"]
    assert warm["hr@10"] > 2 * text["groups"]["warm"]["baselines"]["most_popular"]["hr@10"]
    assert (runs / "text" / "content" / "text.safetensors").exists()  # encoded once, cached


def test_validation_calibrates_the_weight_of_cold_items(runs):
    """Validation's cold targets (cold_val_items) fit how much the content-match score of
    items without an ID counts; the checkpoint keeps it, so test and serving use it."""
    from foundation.metrics.calibration import COLD_SCALES
    from foundation.tracking import best_validation

    rows = [json.loads(line) for line in (runs / "text" / "metrics.jsonl").read_text().splitlines()]
    final = [row for row in rows if row.get("split") == "val"][-1]
    assert final["cold_scale"] in COLD_SCALES and final["cold/users"] > 0
    reference = best_validation(runs / "ids")  # model.cold_reference: the ID-only run
    assert final["warm/ndcg@10"] >= 0.95 * reference["warm/ndcg@10"]  # within cold_budget
    assert "cold_scale" not in _report(runs / "text")["metrics"]  # test only applies it


def test_a_cold_reference_must_be_a_run_on_the_same_build(runs, cold_world, synth_shards):
    common = ["trainer.max_steps=1", "model.item_content=[text]", "model.content_match=true",
              f"run_dir={runs / 'refused'}", *FAST]
    for reference, data, message in ((runs / "ids", synth_shards, "its warm users are other"),
                                     (runs / "nothing", cold_world, "is not a training run")):
        result = foundation("train", f"data.path={data}", f"model.cold_reference={reference}",
                            *common, check=False)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


def test_compare_one_group_of_users(runs):
    out = foundation("eval", "compare", str(runs / "ids"), str(runs / "text"), "--group", "cold",
                     "--output", str(runs / "cold.json"))
    result = json.loads((runs / "cold.json").read_text())
    users = _report(runs / "text")["groups"]["cold"]["metrics"]["users"]
    assert result["users"] == users and "[cold]" in out
    assert result["metrics"]["ndcg@10"]["verdict"] == "B better"


@pytest.fixture(scope="module")
def bundle(runs, cold_world):
    """A content model whose text tower's top layer trains with it (a short run: each step
    runs that layer forward and backward over the batch's titles), exported."""
    tuned, out = runs / "tuned", runs / "bundle"
    foundation("train", "--nproc=2", f"run_dir={tuned}", f"data.path={cold_world}",
               "trainer.max_steps=10", "trainer.eval_every=0", "trainer.eval_batches=2", *FAST,
               *CONTENT, "model.text_tower.trainable_layers=1")
    foundation("export", "--nproc=2", f"run_dir={tuned}", f"output={out}", "precisions=[fp32]")
    return out


def test_the_bundle_embeds_new_titles_as_the_model_does(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"towers/text.pt2", "towers/text.onnx", "towers/text_tokenizer.json",
            "towers/text_match.pt2",  # the tuned tower, and the frozen one content match reads
            "embeddings/content_text.safetensors",
            "embeddings/content_match.safetensors"} <= set(manifest["files"])
    towers = manifest["parity"]["towers"]  # the gate served items as new ones, both backends
    assert towers["items"] == 64 and towers["members"] >= 200  # val samples with a cold target are left out
    assert max(towers["max_abs_diff"].values()) <= 1e-4
    import numpy as np

    from foundation.export import load_bundle

    predictor = load_bundle(bundle)  # the tuned tower moved away from the frozen one
    spec = manifest["content"]["modalities"]["text"]
    titles = ["a title of the test world", "another one"]
    tuned = predictor._encode("text", spec, titles)
    frozen = predictor._encode("text", {**spec, "program": spec["match_program"]}, titles)
    assert np.abs(tuned - frozen).max() > 1e-3


def test_a_new_title_like_the_history_is_recommended_at_once(bundle, cold_world):
    """A title added to the bundle after export, with the text of a history's items, ranks
    in the top 10% of the catalogue for that history; recommend and score return it."""
    import numpy as np

    from foundation.data.loader import build_loader
    from foundation.export import History, load_bundle

    titles = dict(line.split("\t") for line in
                  (cold_world / "raw/item_text.tsv").read_text().splitlines()[1:])
    raw_ids = np.load(cold_world / "item_ids.npy")
    batch = next(iter(build_loader(str(cold_world), "test", batch_size=20, max_len=50)))
    predictor = load_bundle(bundle)
    ranks, members = [], []
    for row, (start, n) in enumerate(zip(batch.offsets()[:-1].tolist(), batch.lengths.tolist())):
        history = raw_ids[batch.item[start:start + n].numpy()].tolist()
        predictor.add_items({10**6 + row: {"text": titles[str(history[-1])]}})
        members.append(History(items=history,
                               timestamps=batch.timestamp[start:start + n].tolist()))
        scores = predictor.score(members[-1], [int(i) for i in predictor.item_ids[1:]])
        ranks.append(int((scores > scores[-1]).sum()) / len(scores))
    assert np.median(ranks) < 0.1, ranks
    best = int(np.argmin(ranks))
    top = predictor.recommend(members[best], k=len(predictor.item_ids) // 10, exclude_seen=False)
    assert 10**6 + best in top  # recommend serves the new title at once
    assert predictor.ann_index().ntotal == len(predictor.item_ids) - 1  # the ANN index too
    with pytest.raises(ValueError, match="already in the catalogue"):
        predictor.add_items({10**6: {"text": "again"}})
    with pytest.raises(ValueError, match="reads \\['text'\\]"):
        predictor.add_items({-5: {"image": "x.png"}})
