"""The synthetic world: deterministic, and learnable from history (not from popularity alone)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from foundation.compose import ConfigError, compose
from foundation.data.commands import run_synth
from foundation.data.synthetic import SynthConfig, generate, synthesize, title_words

SMALL = {"members": 300, "items": 200, "shards_per_split": 4}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    a = synthesize(SynthConfig(output=str(tmp_path / "a"), seed=3, **SMALL))
    synthesize(SynthConfig(output=str(tmp_path / "b"), seed=3, **SMALL))
    synthesize(SynthConfig(output=str(tmp_path / "c"), seed=4, **SMALL))
    raw = Path("raw/events.parquet")
    assert _sha(tmp_path / "a" / raw) == _sha(tmp_path / "b" / raw)
    assert _sha(tmp_path / "a" / raw) != _sha(tmp_path / "c" / raw)
    shard = a["splits"]["train"]["shards"][0]["path"]
    assert _sha(tmp_path / "a" / shard) == _sha(tmp_path / "b" / shard)
    b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert {**a, "source": None} == {**b, "source": None}  # only the source path differs


@pytest.fixture(scope="module")
def world():
    cfg = SynthConfig(output="unused", members=1500, items=400)
    return cfg, generate(cfg)


def _rows(member_id: np.ndarray) -> list[slice]:
    cuts = np.flatnonzero(np.diff(member_id)) + 1
    return [slice(s, e) for s, e in zip(np.r_[0, cuts], np.r_[cuts, len(member_id)])]


def test_histories_are_time_ordered_with_realistic_gaps(world):
    cfg, w = world
    ev = w["events"]
    rows = _rows(ev["member_id"])
    sizes = np.array([r.stop - r.start for r in rows])
    assert len(rows) == cfg.members and sizes.min() >= cfg.min_history and sizes.max() <= cfg.max_history
    assert abs(sizes.mean() - cfg.mean_history) < 0.25 * cfg.mean_history and sizes.max() > 3 * sizes.mean()
    gaps = np.concatenate([np.diff(ev["timestamp"][r]) for r in rows])
    assert (gaps > 0).all()
    assert np.median(gaps) < 3600 and np.quantile(gaps, 0.9) > 6 * 3600  # sessions + breaks
    assert {"play", "complete", "thumbs_up", "thumbs_down"} <= set(ev["action"])


def test_series_continue_with_the_next_episode(world):
    _, w = world
    ev, cat = w["events"], w["catalogue"]
    item = ev["item_id"] - 1
    same_member = ev["member_id"][1:] == ev["member_id"][:-1]
    prev, nxt = item[:-1][same_member], item[1:][same_member]
    pending = cat.next_episode[prev] >= 0
    continued = (cat.next_episode[prev] == nxt)[pending].mean()
    assert continued > 0.7  # P_CONTINUE, far above chance (1 / items)
    assert (cat.episode[nxt][cat.next_episode[prev] == nxt] > 1).all()


def test_searches_name_their_title_and_follow_the_members_taste(world):
    cfg, w = world
    searches, cat, ev = w["searches"], w["catalogue"], w["events"]
    assert len(searches["query"]) == cfg.members * cfg.searches_per_member
    last_event = np.maximum.reduceat(ev["timestamp"], np.r_[0, np.flatnonzero(
        np.diff(ev["member_id"])) + 1])
    assert (searches["timestamp"] > last_event[searches["member_id"] - 1]).all()
    titles = [set(title_words(t)) for t in w["titles"]]
    words = [query.split() for query in searches["query"]]
    named = np.mean([set(q) <= titles[i - 1] for q, i in zip(words, searches["item_id"])])
    assert named > 0.7  # typos and the rare unmatched genre word aside
    # What a member searches for comes from their taste: its genre is one their history
    # holds far more than its share of the catalogue.
    genre_of = cat.genre[searches["item_id"] - 1]
    histories = np.split(cat.genre[ev["item_id"] - 1], np.flatnonzero(np.diff(ev["member_id"])) + 1)
    own = np.mean([np.mean(histories[m - 1] == g)
                   for m, g in zip(searches["member_id"], genre_of)])
    assert own > 2 / cfg.genres, own  # twice the genre's share of the catalogue


def test_sends_are_randomised_and_their_true_uplift_is_what_the_arms_measure(world):
    cfg, w = world
    sends = w["sends"]
    sent, outcome, uplift = sends["sent"].astype(bool), sends["outcome"], sends["uplift"]
    assert len(sent) == cfg.members * cfg.sends_per_member
    # Randomised: as many sent among the most and the least persuadable.
    high = uplift > np.median(uplift)
    assert abs(sent[high].mean() - sent[~high].mean()) < 0.03
    # The arms' difference estimates the mean true uplift, which is clearly above zero.
    measured = outcome[sent].mean() - outcome[~sent].mean()
    error = 3 * np.sqrt(outcome[sent].var() / sent.sum() + outcome[~sent].var() / (~sent).sum())
    assert abs(measured - uplift.mean()) < error and uplift.mean() > error
    # Responders are not the persuadable: messages about the next part of the series a
    # member is on are played without any message, and gain least.
    ev, cat = w["events"], w["catalogue"]
    last_item = ev["item_id"][np.r_[np.flatnonzero(np.diff(ev["member_id"])), len(ev["item_id"]) - 1]]
    pending = cat.next_episode[last_item - 1][sends["member_id"] - 1]
    sure = sends["item_id"] - 1 == pending
    assert sure.sum() > 100 and outcome[sure & ~sent].mean() > 3 * outcome[~sent].mean()
    assert uplift[sure].mean() < 0.5 * uplift.mean()
    top = uplift >= np.quantile(uplift, 0.8)
    assert uplift[top].mean() > 2.5 * uplift.mean()


def test_history_beats_popularity_for_next_item_and_engagement(world):
    cfg, w = world
    ev, cat, imp = w["events"], w["catalogue"], w["impressions"]
    item = ev["item_id"] - 1
    pop = np.bincount(item, minlength=cfg.items).astype(float)
    top10 = set(np.argsort(-pop)[:10].tolist())
    hits_pop = hits_hist = 0
    favourite = np.zeros(cfg.members, np.int64)
    for m, r in enumerate(_rows(ev["member_id"])):
        hist, target = item[r][:-1], item[r][-1]
        genre_freq = np.bincount(cat.genre[hist], minlength=cfg.genres) + 0.1
        favourite[m] = genre_freq.argmax()
        score = genre_freq[cat.genre] * pop
        if cat.next_episode[hist[-1]] >= 0:
            score[cat.next_episode[hist[-1]]] = np.inf
        hits_pop += target in top10
        hits_hist += target in set(np.argsort(-score)[:10].tolist())
    assert hits_hist > 2.0 * hits_pop  # a history-reading model has a lot to learn
    # Engagement: "the member's most frequent genre" predicts labels; popularity barely does.
    labels = imp["label"]
    fav = cat.genre[imp["item_id"] - 1] == favourite[imp["member_id"] - 1]
    assert labels[fav].mean() > 2.5 * labels[~fav].mean()
    popular = pop[imp["item_id"] - 1] > np.median(pop[imp["item_id"] - 1])
    assert labels[popular].mean() < 2.0 * labels[~popular].mean()
    # Impressions happen after the member's history.
    last = np.array([ev["timestamp"][r][-1] for r in _rows(ev["member_id"])])
    assert (imp["timestamp"] > last[imp["member_id"] - 1]).all()


def test_synth_command_composes_and_requires_output(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("foundation"), "propagate", True)  # to caplog
    caplog.set_level(logging.INFO, logger="foundation")
    with pytest.raises(ConfigError, match="output"):
        compose("data_synth", ["world.members=10"])
    with pytest.raises(ConfigError, match="world.memberz"):
        compose("data_synth", [f"output={tmp_path}", "world.memberz=10"])
    cfg = compose("data_synth", [f"output={tmp_path}", "world.members=120", "world.items=80",
                                 "world.shards_per_split=2", "progress=false"])
    assert run_synth(cfg) == 0
    assert "synthesized 120 members" in caplog.text
    assert (tmp_path / "manifest.json").is_file() and (tmp_path / "raw" / "catalogue.parquet").is_file()
