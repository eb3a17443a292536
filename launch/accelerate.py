"""Accelerate: ``accelerate launch`` with a generated config whose DeepSpeed section is a file
holding the run's own engine config (one source for ZeRO stage, batch and clipping). Under
``engine=fsdp`` the engine shards the dense arch itself: Accelerate only starts the processes
(``MULTI_GPU``: torchrun)."""

from __future__ import annotations

import json
from typing import Any

import yaml

from foundation.launch.config import LauncherConfig

CONFIG, DEEPSPEED = "accelerate.yaml", "deepspeed.json"


def accelerate_config(cfg: LauncherConfig, launch_dir: str, deepspeed: bool = True
                       ) -> dict[str, Any]:
    config: dict[str, Any] = {"compute_environment": "LOCAL_MACHINE",
                              "distributed_type": "DEEPSPEED" if deepspeed else "MULTI_GPU"}
    if deepspeed:
        # Only where DeepSpeed's config is and how nodes start: every DeepSpeed key lives in it.
        config["deepspeed_config"] = {"deepspeed_config_file": f"{launch_dir}/{DEEPSPEED}",
                                      "deepspeed_multinode_launcher": "standard"}
    return {
        **config,
        "machine_rank": 0,
        "main_process_ip": cfg.master_addr,
        "main_process_port": cfg.master_port,
        "main_training_function": "main",
        "mixed_precision": cfg.accelerate.mixed_precision,
        "num_machines": cfg.nnodes,
        "num_processes": cfg.world_size,
        "rdzv_backend": "c10d" if cfg.nnodes > 1 else "static",
        "same_network": False,
        "use_cpu": False,
    }


def command(cfg: LauncherConfig, launch_dir: str, module: str, args: list[str]) -> list[str]:
    """The command each node runs (node k: ``--machine_rank k``)."""
    rank = ["--machine_rank", "$NODE_RANK"] if cfg.nnodes > 1 else []
    return ["accelerate", "launch", "--config_file", f"{launch_dir}/{CONFIG}", *rank,
            "-m", module, *args]


def files(cfg: LauncherConfig, launch_dir: str, engine: dict[str, Any] | None
          ) -> dict[str, str]:
    """File name → text: the accelerate config and the DeepSpeed config it points to (None:
    another engine, no DeepSpeed file)."""
    texts = {CONFIG: yaml.safe_dump(accelerate_config(cfg, launch_dir, engine is not None),
                                    sort_keys=False)}
    if engine is not None:
        texts[DEEPSPEED] = json.dumps(engine, indent=2) + "\n"
    return texts

