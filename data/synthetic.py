"""A deterministic, learnable synthetic member world (events, catalogue, impressions → shards).

Members have a Dirichlet genre taste that drifts between sessions; titles have a primary
(sometimes a secondary) genre and Zipf popularity; a member in the middle of a series mostly
watches the next episode. Actions and impression engagement follow the member's current
affinity for the title's genre, so reading the history predicts far better than popularity.
Generation steps over event positions, vectorised over all members still active.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import MISSING

from foundation.data.schema import ACTIONS, DEVICE_NAMES, DEVICES
from foundation.data.sources import SourceConfig
from foundation.data.writer import BuildConfig, build_shards

T0 = 1_600_000_000  # 2020-09-13, start of the synthetic calendar
DAY, MINUTE = 86_400, 60
TASTE_ALPHA = 0.2  # Dirichlet concentration: < 1 makes tastes peaked on a few genres
ZIPF = 0.9
P_CONTINUE = 0.85  # watch the next episode when one is pending
P_EXPLORE = 0.1  # pick by global popularity, ignoring taste
P_NEW_SESSION = 0.3


@dataclass
class SynthConfig:
    seed: int = 0
    members: int = 2000
    items: int = 1000
    genres: int = 16
    series_fraction: float = 0.3  # fraction of items that are episodes (series of 3-10)
    mean_history: int = 40
    min_history: int = 5
    max_history: int = 200
    taste_drift: float = 0.05  # per-session mix-in of a fresh taste sample
    impressions_per_member: int = 60  # titles shown after each history, each engaged or not
    searches_per_member: int = 3  # search sessions after each history (0: none)
    sends_per_member: int = 40  # candidate messages after each history, half held out (0: none)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    shards_per_split: int = 8
    cold_items: float = 0.0  # held out of train/val samples (see BuildConfig.cold_items)
    cold_val_items: float = 0.0  # held out of train samples only (BuildConfig.cold_val_items)
    media: bool = True  # a rendered poster (png) and a short audio clip (wav) per item
    output: str = MISSING


@dataclass
class Catalogue:
    genre: np.ndarray  # [I] primary genre
    secondary: np.ndarray  # [I] secondary genre or -1
    popularity: np.ndarray  # [I] probabilities, Zipf
    series_id: np.ndarray  # [I] 0 = not an episode
    episode: np.ndarray  # [I] 1.. within the series, 0 = not an episode
    next_episode: np.ndarray  # [I] index of the next episode or -1
    first_episode: np.ndarray  # [I] index of the series' first episode (self when none)
    release_time: np.ndarray  # [I]


def make_catalogue(cfg: SynthConfig, rng: np.random.Generator) -> Catalogue:
    n, g = cfg.items, cfg.genres
    genre = rng.integers(g, size=n)
    secondary = np.where(rng.random(n) < 0.3, (genre + rng.integers(1, g, size=n)) % g, -1)
    popularity = 1.0 / (rng.permutation(n) + 1.0) ** ZIPF
    series_id, episode = np.zeros(n, np.int64), np.zeros(n, np.int64)
    next_episode, first_episode = np.full(n, -1), np.arange(n)
    release = T0 - rng.integers(0, 3 * 365 * DAY, size=n)
    order, pos, sid = rng.permutation(n)[: int(n * cfg.series_fraction)], 0, 0
    while pos + 3 <= len(order):  # cut the chosen items into series of 3-10 episodes
        eps = order[pos: pos + int(rng.integers(3, 11))]
        pos, sid = pos + len(eps), sid + 1
        series_id[eps], episode[eps] = sid, np.arange(1, len(eps) + 1)
        genre[eps], first_episode[eps] = genre[eps[0]], eps[0]
        next_episode[eps[:-1]] = eps[1:]
        popularity[eps] = popularity[eps[0]] * 0.9 ** np.arange(len(eps))  # viewers drop off
        release[eps] = np.sort(release[eps])  # episodes air in order
    return Catalogue(genre, secondary, popularity / popularity.sum(), series_id, episode,
                     next_episode, first_episode, release)


class _ItemSampler:
    """Popularity-weighted sampling of items, globally or within a genre (vectorised)."""

    def __init__(self, cat: Catalogue, genres: int):
        self.by_genre = np.argsort(cat.genre, kind="stable")
        cum = np.cumsum(cat.popularity[self.by_genre])
        self.cum = cum / cum[-1]
        counts = np.bincount(cat.genre, minlength=genres)
        ends = np.cumsum(counts)
        self.lo = np.concatenate([[0.0], self.cum])[ends - counts]  # mass before genre g
        self.hi = np.concatenate([[0.0], self.cum])[ends]
        self.global_cum = np.cumsum(cat.popularity) / cat.popularity.sum()

    def in_genre(self, genre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        u = self.lo[genre] + rng.random(len(genre)) * (self.hi[genre] - self.lo[genre])
        return self.by_genre[np.minimum(np.searchsorted(self.cum, u, side="right"), len(self.cum) - 1)]

    def popular(self, size: int, rng: np.random.Generator) -> np.ndarray:
        idx = np.searchsorted(self.global_cum, rng.random(size), side="right")
        return np.minimum(idx, len(self.global_cum) - 1)


def affinity(taste: np.ndarray, cat: Catalogue, items: np.ndarray) -> np.ndarray:
    """Relative affinity of each row's member for its item: 1.0 = an average genre."""
    g = taste.shape[1]
    aff = taste[np.arange(len(items)), cat.genre[items]]
    sec = cat.secondary[items]
    aff = aff + np.where(sec >= 0, 0.5 * taste[np.arange(len(items)), np.maximum(sec, 0)], 0.0)
    return aff * g


def _categorical(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of a [N, K] probability matrix."""
    cum = np.cumsum(probs, axis=1)
    return np.minimum((rng.random((len(probs), 1)) * cum[:, -1:] > cum).sum(1), probs.shape[1] - 1)


def _actions(aff: np.ndarray, continued: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every event is at least a play; stronger affinity → complete / thumbs up / list."""
    s = aff / (aff + 1.0)
    s = np.where(continued, np.maximum(s, 0.8), s)
    probs = np.stack([np.full_like(s, 0.03), 0.25 * (1 - s) ** 2, 0.05 * s, 0.15 * s, 0.5 * s], 1)
    names = ("search", "thumbs_down", "add_to_list", "thumbs_up", "complete")
    codes = np.array([ACTIONS.index(a) for a in names])
    cum = np.cumsum(probs, 1)
    pick = (rng.random((len(s), 1)) > cum).sum(1)  # index past the last threshold = plain play
    return np.where(pick < len(names), codes[np.minimum(pick, len(names) - 1)], ACTIONS.index("play"))


class _World:
    """Member state stepped one event position at a time."""

    def __init__(self, cfg: SynthConfig, cat: Catalogue, rng: np.random.Generator):
        m = cfg.members
        self.cfg, self.cat, self.rng = cfg, cat, rng
        self.sampler = _ItemSampler(cat, cfg.genres)
        sigma = 0.9
        raw = rng.lognormal(np.log(cfg.mean_history) - sigma**2 / 2, sigma, size=m)
        self.length = np.clip(np.round(raw), cfg.min_history, cfg.max_history).astype(np.int64)
        self.taste = rng.dirichlet(np.full(cfg.genres, TASTE_ALPHA), size=m)
        self.device_pref = rng.dirichlet(np.full(len(DEVICES) - 1, 0.5), size=m)
        self.time = T0 + rng.integers(0, 365 * DAY, size=m)
        self.device = np.zeros(m, np.int64)
        self.pending = np.full(m, -1)  # next episode of the series in progress

    def step(self, t: int) -> dict[str, np.ndarray]:
        rng, cat = self.rng, self.cat
        act = np.flatnonzero(self.length > t)
        new = np.ones(len(act), bool) if t == 0 else rng.random(len(act)) < P_NEW_SESSION
        self._new_sessions(act[new], first=t == 0)
        inside = act[~new]
        self.time[inside] += (rng.lognormal(np.log(25 * MINUTE), 0.5, len(inside))).astype(np.int64)
        items, continued = self._choose(act)
        aff = affinity(self.taste[act], cat, items)
        self.pending[act] = cat.next_episode[items]
        return {"member": act, "item": items, "timestamp": self.time[act].copy(),
                "action": _actions(aff, continued, rng), "device": self.device[act].copy()}

    def _new_sessions(self, members: np.ndarray, first: bool) -> None:
        rng, d = self.rng, self.cfg.taste_drift
        fresh = rng.dirichlet(np.full(self.cfg.genres, TASTE_ALPHA), size=len(members))
        self.taste[members] = (1 - d) * self.taste[members] + d * fresh
        self.device[members] = 1 + _categorical(self.device_pref[members], rng)
        if not first:  # hours to days between sessions
            self.time[members] += rng.lognormal(np.log(0.7 * DAY), 1.0, len(members)).astype(np.int64)

    def _choose(self, act: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng, cat = self.rng, self.cat
        genre = _categorical(self.taste[act], rng)
        items = self.sampler.in_genre(genre, rng)
        starts = (cat.episode[items] > 1) & (rng.random(len(act)) < 0.8)  # series start at ep. 1
        items = np.where(starts, cat.first_episode[items], items)
        explore = rng.random(len(act)) < P_EXPLORE
        items = np.where(explore, self.sampler.popular(len(act), rng), items)
        pend = self.pending[act]
        continued = (pend >= 0) & (rng.random(len(act)) < P_CONTINUE)
        return np.where(continued, pend, items), continued

    def impressions(self) -> dict[str, np.ndarray]:
        """Titles shown after each history; engagement follows current affinity strongly."""
        rng, cat, k, m = self.rng, self.cat, self.cfg.impressions_per_member, self.cfg.members
        popular = self.sampler.popular(m * k, rng).reshape(m, k)
        uniform = rng.integers(cat.genre.size, size=(m, k))
        shown = np.where(rng.random((m, k)) < 0.5, popular, uniform)
        slot = rng.integers(k, size=m)  # the pending next episode is shown half the time
        show_next = (self.pending >= 0) & (rng.random(m) < 0.5)
        shown[np.arange(m)[show_next], slot[show_next]] = self.pending[show_next]
        member = np.repeat(np.arange(m), k)
        items = shown.reshape(-1)
        aff = affinity(self.taste[member], cat, items)
        pop_z = np.log(cat.popularity[items])
        pop_z = (pop_z - pop_z.mean()) / (pop_z.std() + 1e-9)
        is_next = items == self.pending[member]
        logit = -2.2 + 1.6 * np.log(aff + 0.1) + 0.3 * pop_z + 3.0 * is_next
        label = (rng.random(len(items)) < 1 / (1 + np.exp(-logit))).astype(np.int64)
        start = self.time + rng.lognormal(np.log(DAY), 0.7, m).astype(np.int64)
        ts = start[member] + np.tile(np.arange(k) * 5, m)
        return {"member_id": member + 1, "item_id": items + 1, "timestamp": ts, "label": label}


def generate(cfg: SynthConfig) -> dict[str, Any]:
    """All tables in memory: events (sorted by member, time), impressions, catalogue."""
    rng = np.random.default_rng(cfg.seed)
    cat = make_catalogue(cfg, rng)
    world = _World(cfg, cat, rng)
    steps = [world.step(t) for t in range(int(world.length.max()))]
    ev = {k: np.concatenate([s[k] for s in steps]) for k in steps[0]}
    order = np.lexsort((ev["timestamp"], ev["member"]))
    events = {"member_id": ev["member"][order] + 1, "item_id": ev["item"][order] + 1,
              "timestamp": ev["timestamp"][order],
              "action": np.asarray(ACTIONS, dtype=object)[ev["action"][order]],
              "device": np.asarray(DEVICES, dtype=object)[ev["device"][order]]}
    titles = item_titles(cat, cfg.seed)
    searches = search_sessions(world.taste, world.pending, cat, titles, cfg.searches_per_member,
                               world.time, np.random.default_rng([cfg.seed, 11]))  # events stay
    sends = message_sends(world, cfg.sends_per_member, np.random.default_rng([cfg.seed, 13]))
    return {"events": events, "impressions": world.impressions(), "catalogue": cat,
            "titles": titles, "searches": searches, "sends": sends}


P_SEND = 0.5  # each candidate message is sent or held out at random (the randomised test)
P_TASTE_SEND = 0.5  # a candidate is a title of the member's taste, else a popular one


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def message_sends(world: _World, per_member: int, rng: np.random.Generator
                  ) -> dict[str, np.ndarray]:
    """``per_member`` candidate messages per member after its history, each about one title
    and sent or held out at random; the outcome is a play of the title within the window.

    A message's true uplift (P(play | sent) − P(play | held out), kept as ``uplift`` for
    checking policies; real data has none) depends on the member and the title: a title the
    member likes but plays rarely unprompted gains most; the series they are on is played
    anyway (a sure thing, no uplift); a title outside their taste loses a little (an unwanted
    message); members who watch on mobile, where messages arrive, react most. So ranking by
    response (P(play | sent)) picks the sure things, and only an uplift model finds the
    persuadable."""
    cat, members = world.cat, len(world.taste)
    if per_member == 0:
        return {name: np.zeros(0, np.float64 if name == "uplift" else np.int64)
                for name in ("member_id", "item_id", "timestamp", "sent", "outcome", "uplift")}
    member = np.repeat(np.arange(members), per_member)
    genre = _categorical(world.taste[member], rng)
    items = np.where(rng.random(len(member)) < P_TASTE_SEND, world.sampler.in_genre(genre, rng),
                     world.sampler.popular(len(member), rng))
    pending = world.pending[member]
    items = np.where((pending >= 0) & (rng.random(len(member)) < 0.25), pending, items)
    aff, on_it = affinity(world.taste[member], cat, items), items == pending
    organic = -2.5 + 1.2 * np.log(aff + 0.1) + 3.0 * on_it
    reach = 0.5 + 1.5 * world.device_pref[member, DEVICE_NAMES.index("mobile")]
    lift = (2.0 * aff / (aff + 1) - 0.6) * reach * np.where(on_it, 0.2, 1.0)  # news to them?
    p_held, p_sent = _sigmoid(organic), _sigmoid(organic + lift)
    sent = rng.random(len(member)) < P_SEND
    outcome = rng.random(len(member)) < np.where(sent, p_sent, p_held)
    ts = world.time[member] + 2 * DAY + np.tile(np.arange(per_member) * 3600, members)
    return {"member_id": member + 1, "item_id": items + 1, "timestamp": ts,
            "sent": sent.astype(np.int64), "outcome": outcome.astype(np.int64),
            "uplift": p_sent - p_held}


# Words of each latent genre: an item's title draws from its genres, so text carries the
# signal a content tower can find (and an ID-free model can score a new title by).
GENRE_WORDS: tuple[tuple[str, ...], ...] = (
    ("space", "galaxy", "starship", "alien"), ("love", "romance", "wedding", "heart"),
    ("murder", "detective", "crime", "case"), ("war", "soldier", "battle", "army"),
    ("ghost", "haunted", "horror", "curse"), ("cooking", "kitchen", "chef", "recipe"),
    ("football", "champion", "team", "stadium"), ("dragon", "wizard", "kingdom", "magic"),
    ("comedy", "laugh", "prank", "funny"), ("ocean", "wildlife", "jungle", "nature"),
    ("cowboy", "frontier", "sheriff", "desert"), ("robot", "future", "cyber", "machine"),
    ("spy", "agent", "secret", "mission"), ("music", "band", "song", "concert"),
    ("family", "kids", "puppy", "holiday"), ("history", "empire", "queen", "ancient"),
)
TITLE_FILLERS = ("the", "of", "night", "last", "return", "story", "days", "new", "a", "in")


def item_titles(cat: Catalogue, seed: int) -> list[str]:
    """One title per item from its genres' words (its own seeded stream: the events do not
    change); episodes share their series' title with a part number."""
    rng = np.random.default_rng([seed, 7])
    titles = []
    for genre, secondary in zip(cat.genre, cat.secondary):
        words = list(rng.choice(GENRE_WORDS[genre % len(GENRE_WORDS)], 2, replace=False))
        if secondary >= 0:
            words.append(str(rng.choice(GENRE_WORDS[secondary % len(GENRE_WORDS)])))
        words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(TITLE_FILLERS)))
        titles.append(" ".join(words).capitalize())
    first = cat.first_episode
    return [f"{titles[first[i]]}, part {cat.episode[i]}" if cat.episode[i] else titles[i]
            for i in range(len(titles))]


# A query is a genre's word, a broad word that titles of every genre hold ("night", "new"),
# or words of one title; one word in five has a typo.
P_GENRE_QUERY, P_BROAD_QUERY, P_TYPO = 0.3, 0.3, 0.2
P_SERIES_SEARCH = 0.5  # a member midway through a series searches for it, for the next part
STOPWORDS = frozenset({"the", "of", "a", "in", "part"})
BROAD_WORDS = tuple(w for w in TITLE_FILLERS if w not in STOPWORDS)


def title_words(title: str) -> list[str]:
    """A title's searchable words (no stopwords, no part numbers)."""
    words = title.lower().replace(",", " ").split()
    return [w for w in words if w not in STOPWORDS and not w.isdigit()]


def search_sessions(taste: np.ndarray, pending: np.ndarray, cat: Catalogue, titles: list[str],
                    per_member: int, after: np.ndarray, rng: np.random.Generator
                    ) -> dict[str, np.ndarray]:
    """``per_member`` searches per member after its history: a genre of the member's current
    taste; a query of that genre's word or of a title's words (a typo now and then); the
    engaged title among those the query's words match, chosen by the member's affinity and
    popularity — so the query narrows the catalogue and the member's taste picks within it
    (most of all for broad words, which match titles of every genre). A member midway through
    a series (``pending``: its next episode) often searches for the series by its title's
    words, which every part shares, and plays the next part."""
    words = [set(title_words(t)) for t in titles]
    index: dict[str, list[int]] = {}
    for item, found in enumerate(words):
        for word in found:
            index.setdefault(word, []).append(item)
    columns: dict[str, list] = {"member_id": [], "item_id": [], "timestamp": [], "query": []}
    sampler = _ItemSampler(cat, taste.shape[1])
    for member in range(len(taste)) if per_member else ():
        genres = _categorical(np.repeat(taste[member:member + 1], per_member, 0), rng)
        for k, genre in enumerate(genres):
            kind = rng.random()
            if pending[member] >= 0 and rng.random() < P_SERIES_SEARCH:
                words_of = sorted(words[pending[member]])
                query = list(rng.choice(words_of, min(len(words_of), 2), replace=False))
            elif kind < P_GENRE_QUERY:
                query = [str(rng.choice(GENRE_WORDS[genre % len(GENRE_WORDS)]))]
            elif kind < P_GENRE_QUERY + P_BROAD_QUERY:
                query = [str(rng.choice(BROAD_WORDS))]
            else:
                seed_item = int(sampler.in_genre(np.array([genre]), rng)[0])
                query = list(rng.choice(sorted(words[seed_item]),
                                        min(len(words[seed_item]), int(rng.integers(1, 3))),
                                        replace=False))
            matches = np.array(sorted(set.intersection(*(set(index.get(w, [])) for w in query)))
                               or np.flatnonzero(cat.genre == genre).tolist() or [0])
            weight = affinity(np.repeat(taste[member:member + 1], len(matches), 0), cat,
                              matches) ** 2 * cat.popularity[matches] ** 0.5
            weight[matches == pending[member]] = weight.sum() * 4  # the part they are on: 80%
            engaged = int(rng.choice(matches, p=weight / weight.sum()))
            columns["member_id"].append(member + 1)
            columns["item_id"].append(engaged + 1)
            columns["timestamp"].append(int(after[member]) + 3600 * (k + 1))
            columns["query"].append(" ".join(_typo(w, rng) if rng.random() < P_TYPO else w
                                             for w in query))
    return {name: np.asarray(values, dtype=object if name == "query" else np.int64)
            for name, values in columns.items()}


def _typo(word: str, rng: np.random.Generator) -> str:
    """The word with two neighbouring letters swapped."""
    if len(word) < 3:
        return word
    i = int(rng.integers(len(word) - 1))
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


IMAGE_SIZE, AUDIO_RATE, AUDIO_SECONDS = 32, 8000, 0.5


def _hue(genre: int) -> np.ndarray:
    """An RGB colour per genre, around the colour wheel."""
    return 0.5 + 0.5 * np.cos(2 * np.pi * (genre / 16 + np.array([0.0, 1 / 3, 2 / 3])))


def render_poster(genre: int, secondary: int, rng: np.random.Generator) -> np.ndarray:
    """A 32×32 RGB poster: the genre picks the background hue and the stripe direction, the
    secondary genre (if any) a disc's hue; noise and the disc's place are the item's own."""
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    stripes = np.sin(2 * np.pi * 4 * (x if genre % 2 else y) + genre)[..., None]
    image = _hue(genre) * (0.75 + 0.25 * stripes)
    if secondary >= 0:
        cy, cx = rng.uniform(0.3, 0.7, size=2)
        disc = (y - cy) ** 2 + (x - cx) ** 2 < 0.04
        image[disc] = _hue(secondary + 8)
    image = image + rng.normal(0, 0.05, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def render_jingle(genre: int, secondary: int, rng: np.random.Generator) -> np.ndarray:
    """Half a second of int16 audio: a tone whose pitch the genre sets, amplitude-modulated
    at a rate the secondary genre sets, plus noise."""
    t = np.arange(int(AUDIO_RATE * AUDIO_SECONDS)) / AUDIO_RATE
    tone = np.sin(2 * np.pi * 220 * 2 ** (genre / 8) * t + rng.uniform(0, 2 * np.pi))
    rate = 2 + (secondary if secondary >= 0 else genre) % 8
    wave = tone * (0.6 + 0.4 * np.sin(2 * np.pi * rate * t)) + rng.normal(0, 0.05, t.size)
    return (np.clip(wave * 0.5, -1, 1) * 32767).astype(np.int16)


def write_media(cat: Catalogue, directory: Path, seed: int) -> None:
    """``ITEM_ID.png`` and ``ITEM_ID.wav`` for every item (ids 1..N, as in the events)."""
    import soundfile
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 11])
    for index, (genre, secondary) in enumerate(zip(cat.genre.tolist(), cat.secondary.tolist())):
        Image.fromarray(render_poster(genre, secondary, rng)).save(directory / f"{index + 1}.png")
        soundfile.write(directory / f"{index + 1}.wav", render_jingle(genre, secondary, rng),
                        AUDIO_RATE, subtype="PCM_16")


def _catalogue_table(cat: Catalogue) -> pa.Table:
    genres = [[int(g)] + ([int(s)] if s >= 0 else []) for g, s in zip(cat.genre, cat.secondary)]
    return pa.table({"item_id": np.arange(1, cat.genre.size + 1), "genres": genres,
                     "series_id": cat.series_id, "episode": cat.episode,
                     "release_time": cat.release_time.astype(np.int64)})


def synthesize(cfg: SynthConfig, progress: bool = False) -> dict[str, Any]:
    """Write raw tables under OUTPUT/raw/ and shards into OUTPUT; return the manifest."""
    if not cfg.output or cfg.output == MISSING:
        raise ValueError("no output directory: pass output=DIR")
    raw = Path(cfg.output) / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    world = generate(cfg)
    pq.write_table(pa.table(world["events"]), raw / "events.parquet")
    pq.write_table(pa.table(world["impressions"]), raw / "impressions.parquet")
    pq.write_table(pa.table(world["searches"]), raw / "searches.parquet")
    pq.write_table(pa.table(world["sends"]), raw / "sends.parquet")
    pq.write_table(_catalogue_table(world["catalogue"]), raw / "catalogue.parquet")
    titles = world["titles"]
    (raw / "item_text.tsv").write_text("item_id\ttitle\n" + "".join(
        f"{i}\t{t}\n" for i, t in enumerate(titles, 1)))
    if cfg.media:
        write_media(world["catalogue"], raw / "media", cfg.seed)
    source = SourceConfig(format="parquet", path=str(raw / "events.parquet"),
                          impressions_path=str(raw / "impressions.parquet"),
                          searches_path=str(raw / "searches.parquet"),
                          sends_path=str(raw / "sends.parquet"),
                          catalogue_path=str(raw / "catalogue.parquet"),
                          item_text_path=str(raw / "item_text.tsv"),
                          item_media_dir=str(raw / "media") if cfg.media else None)
    build = BuildConfig(source=source, output=cfg.output, seed=cfg.seed,
                        val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                        shards_per_split=cfg.shards_per_split, cold_items=cfg.cold_items,
                        cold_val_items=cfg.cold_val_items, cold_seed=cfg.seed)
    return build_shards(build, progress=progress)
