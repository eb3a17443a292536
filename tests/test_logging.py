"""Run logging: metrics.jsonl rows, and wandb offline (no key, no network) in the run dir."""

import json

from foundation.tracking import LoggerConfig, RunLogger


def test_metrics_jsonl_and_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = RunLogger(LoggerConfig(wandb=True, progress=False), tmp_path, enabled=True,
                       total_steps=2, config={"seed": 0}, name="t")
    logger.log({"step": 1, "loss": 2.5})
    logger.log({"step": 2, "loss": 2.0, "split": "val"})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["loss"] for r in rows] == [2.5, 2.0]
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert offline, "wandb should have written an offline run inside the run dir"


def test_non_main_ranks_write_nothing(tmp_path):
    logger = RunLogger(LoggerConfig(wandb=True, progress=False), tmp_path, enabled=False,
                       total_steps=1)
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "wandb").exists()
