"""What the parity gate serves: evaluation members as a caller holds them (whole histories,
raw catalogue ids, every stored event attribute), read on each export rank."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from foundation.data.batch import SequenceBatch
from foundation.data.loader import build_loader
from foundation.eval.run import TrainedRun
from foundation.export.bundle import PARITY_FIELDS
from foundation.tasks import synchronised


def whole_histories(run: TrainedRun, cfg: DictConfig, mode: str = "sequence"
                    ) -> Iterator[tuple[SequenceBatch, bool]]:
    """This rank's first ``cfg.parity_batches`` batches of ``cfg.parity_split``, untruncated
    (time gaps are read from the whole history, as serving reads them), in step with the
    other ranks (``real`` false: a finished rank's stand-in)."""
    whole = build_loader(run.cfg.data.path, cfg.parity_split, batch_size=cfg.batch_size,
                         max_len=1 << 30, rank=run.env.rank, world_size=run.env.world_size,
                         shuffle=False, mode=mode)
    for index, pair in enumerate(synchronised(whole, run.env.world_size)):
        if index >= cfg.parity_batches:
            break
        yield pair


def raw_ids(run: TrainedRun) -> np.ndarray:
    """Catalogue id (as in the source data) of each internal item id."""
    return np.load(Path(run.cfg.data.path) / "item_ids.npy", allow_pickle=False)


def caller_history(run: TrainedRun, history: SequenceBatch, ids: np.ndarray
                   ) -> dict[str, np.ndarray]:
    """``history``'s events as a caller passes them: raw item ids, timestamps, lengths and
    each stored event feature (``event_<name>``)."""
    fields = {key: getattr(history, key).numpy() for key in PARITY_FIELDS}
    fields["item"] = ids[fields["item"]]
    fields.update({f"event_{name}": history.events[name].numpy()
                   for name in run.task.schema.stored})
    return fields


def save_rank(root: Path, run: TrainedRun, parts: dict[str, list[np.ndarray]]) -> None:
    if not parts:
        raise ValueError(f"rank {run.env.rank} got no parity data; export on fewer ranks or "
                         f"choose another parity_split")
    np.savez(root / f"rank{run.env.rank}.npz", **{k: np.concatenate(v) for k, v in parts.items()})
