"""``foundation train --launcher local|slurm|k8s|accelerate [--dry-run]``: check the job,
then start it here, or write and submit what the cluster runs (``--dry-run``: print it and
submit nothing)."""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from foundation.launch import accelerate, k8s, slurm
from foundation.launch.config import (
    LauncherConfig,
    LauncherName,
    LaunchError,
    check_head_address,
    check_run_batch,
)
from foundation.launch.torchrun import local_command, run_local

log = logging.getLogger(__name__)
MODULE = "foundation.train"


def launcher_config(cfg: DictConfig) -> LauncherConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LauncherConfig), cfg.launcher))


def check(cfg: DictConfig, launcher: LauncherConfig) -> None:
    """What must hold before any process starts (LaunchError names the fix)."""
    check_run_batch(cfg, launcher.world_size)
    if launcher.name in (LauncherName.local, LauncherName.accelerate):
        check_head_address(launcher.master_addr, launcher.nnodes, launcher.single_machine)


def launch(cfg: DictConfig, overrides: list[str], dry_run: bool = False) -> int:
    """Start (or print) the training job ``cfg`` composed from ``overrides``."""
    launcher = launcher_config(cfg)
    check(cfg, launcher)
    launch_dir = Path(cfg.run_dir) / "launch"
    if launcher.name == LauncherName.local:
        if dry_run:
            print(shlex.join(local_command(launcher, MODULE, overrides)))
            return 0
        return run_local(launcher, MODULE, overrides)
    if launcher.name == LauncherName.slurm:
        script = slurm.sbatch_script(launcher, MODULE, overrides, log_dir=f"{cfg.run_dir}/slurm")
        return _emit({"job.sbatch": script}, launch_dir, dry_run, submit=_sbatch)
    if launcher.name == LauncherName.k8s:
        manifest = k8s.manifest(launcher, MODULE, overrides, run_dir=str(cfg.run_dir))
        return _emit({"pytorchjob.yaml": manifest}, launch_dir, dry_run, submit=_kubectl)
    return _accelerate(cfg, launcher, launch_dir, overrides, dry_run)


def _emit(texts: dict[str, str], launch_dir: Path, dry_run: bool, submit) -> int:
    if dry_run:
        for name, text in texts.items():
            print(f"# ---- {launch_dir / name} (not written: --dry-run)\n{text}", end="")
        return 0
    _write(launch_dir, texts)
    return submit(launch_dir, texts)


def _write(launch_dir: Path, texts: dict[str, str]) -> None:
    launch_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (launch_dir / name).write_text(text)


def _sbatch(launch_dir: Path, texts: dict[str, str]) -> int:
    (launch_dir.parent / "slurm").mkdir(exist_ok=True)  # Slurm does not create log folders
    job = slurm.submit(texts["job.sbatch"])
    log.info(f"submitted Slurm job {job} ({launch_dir / 'job.sbatch'}); logs in the run's slurm/")
    return 0


def _kubectl(launch_dir: Path, texts: dict[str, str]) -> int:  # noqa: ARG001
    path = launch_dir / "pytorchjob.yaml"
    if shutil.which("kubectl") is None:
        raise LaunchError(f"kubectl is not on PATH: apply {path} where it is (--dry-run "
                          f"prints it)")
    code = subprocess.call(["kubectl", "apply", "-f", str(path)])
    if code == 0:
        log.info(f"applied {path}; follow it with kubectl get pytorchjobs")
    return code


def _accelerate(cfg: DictConfig, launcher: LauncherConfig, launch_dir: Path,
                overrides: list[str], dry_run: bool) -> int:
    from foundation.distributed.engine import EngineName, deepspeed_config

    engine = deepspeed_config(cfg.engine, cfg.trainer.optim, micro_batch=cfg.data.batch_size,
                              grad_accum=cfg.trainer.grad_accum,
                              bf16=cfg.engine.bf16 != "off"  # auto: on, the launch is for GPUs
                              ) if cfg.engine.name == EngineName.deepspeed else None
    texts = accelerate.files(launcher, str(launch_dir), engine)
    command = accelerate.command(launcher, str(launch_dir), MODULE, overrides)
    if dry_run:
        _emit(texts, launch_dir, dry_run=True, submit=None)
        print("# ---- the command" + (" on each node (NODE_RANK: 0 .. nnodes-1)"
                                      if launcher.nnodes > 1 else "") + "\n"
              + " ".join(w if w.startswith("$") else shlex.quote(w) for w in command))
        return 0
    if launcher.nnodes > 1:
        command = [w.replace("$NODE_RANK", str(launcher.node_rank)) for w in command]
    _write(launch_dir, texts)
    return subprocess.call([str(Path(sys.executable).with_name("accelerate")), *command[1:]])

