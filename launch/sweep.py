"""Sweeps: ``foundation train -m key=a,b other=c,d`` runs every combination in its own run
directory (RUN/0, RUN/1, ...; RUN/sweep.json says which is which), one after another on this
machine or as one job each through the launcher (``--launcher slurm``: one sbatch job per
combination). ``foundation report RUN`` puts their validation in one table."""

from __future__ import annotations

import itertools
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig

from foundation.compose import ConfigError, compose
from foundation.launch.config import LauncherName
from foundation.launch.launcher import launch

log = logging.getLogger(__name__)
SWEEP_FILE = "sweep.json"


def combinations(overrides: list[str]) -> tuple[list[str], list[dict[str, str]]]:
    """The fixed overrides, and each combination of the swept ones (key → value)."""
    fixed, swept = [], []
    try:
        for override in OverridesParser.create().parse_overrides(overrides):
            key = override.get_key_element().lstrip("+~")
            if override.is_sweep_override() and key == "run_dir":
                raise ConfigError("run_dir cannot be swept: a sweep's runs go to RUN/0, RUN/1, "
                                  "... under the one run_dir=RUN")
            if override.is_sweep_override():
                swept.append([(key, value) for value in override.sweep_string_iterator()])
            else:
                fixed.append(override.input_line)
    except HydraException as err:  # glob() and interval() sweeps have no finite list here
        raise ConfigError(f"cannot expand the sweep ({err}): sweep over lists (key=a,b), "
                          f"range() or choice()") from None
    return fixed, [dict(combo) for combo in itertools.product(*swept)]


def run_sweep(overrides: list[str], dry_run: bool = False) -> int:
    """Compose (and so validate) every combination, then start them in order."""
    fixed, combos = combinations(overrides)
    base = Path(compose("train", fixed).run_dir)
    fixed = [o for o in fixed  # each run has its own run_dir
             if o.lstrip("+~").split("=", 1)[0] != "run_dir"]
    jobs = []
    for index, combo in enumerate(combos):
        job = [*fixed, *(f"{key}={value}" for key, value in combo.items()),
               f"run_dir={base / str(index)}"]
        jobs.append((job, compose("train", job)))  # a bad value fails before any run starts
    if not dry_run:
        base.mkdir(parents=True, exist_ok=True)
        (base / SWEEP_FILE).write_text(json.dumps(
            {"fixed": fixed, "runs": [{"dir": str(i), "overrides": combo}
                                     for i, combo in enumerate(combos)]}, indent=2) + "\n")
    failed = []
    for index, ((job, cfg), combo) in enumerate(zip(jobs, combos, strict=True)):
        log.info(f"sweep {index + 1}/{len(jobs)}: "
                 + " ".join(f"{key}={value}" for key, value in combo.items()))
        if _start(cfg, job, dry_run):
            failed.append(index)
    verb = "printed" if dry_run else ("submitted" if jobs and _remote(jobs[0][1]) else "ran")
    log.info(f"sweep: {verb} {len(jobs)} runs in {base}" + (
        f"; failed: {', '.join(map(str, failed))}" if failed else "")
        + ("" if dry_run else f"; compare them: foundation report {base}"))
    return 1 if failed else 0


def _remote(cfg: DictConfig) -> bool:
    return cfg.launcher.name != LauncherName.local


def _start(cfg: DictConfig, job: list[str], dry_run: bool) -> int:
    """One combination: a process of its own here (a clean process group per run), or the
    launcher's job."""
    one_process = cfg.launcher.nproc * cfg.launcher.nnodes == 1 and not cfg.launcher.max_restarts
    if _remote(cfg) or not one_process:
        return launch(cfg, job, dry_run=dry_run)
    command = [sys.executable, "-m", "foundation.train", *job]
    if dry_run:
        print(shlex.join(command))
        return 0
    return subprocess.call(command)
