"""Kubernetes: a Kubeflow PyTorchJob with an elastic policy. The training operator gives each
worker pod torchrun's settings as PET_* variables (rendezvous endpoint, node range, processes
per node), which the agent's torchrun reads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from foundation.launch.config import LauncherConfig
from foundation.launch.torchrun import AGENT


def job_name(cfg: LauncherConfig, run_dir: str) -> str:
    """A name of its own per run (a sweep's runs too), as Kubernetes allows: DNS-1123, ≤ 63."""
    parts = [cfg.job_name, *Path(run_dir).parts[-2:]]
    name = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
    return name[-63:].lstrip("-") or "foundation"


def pytorchjob(cfg: LauncherConfig, module: str, args: list[str], run_dir: str
               ) -> dict[str, Any]:
    k8s = cfg.k8s
    container: dict[str, Any] = {
        "name": "pytorch", "image": k8s.image, "imagePullPolicy": "IfNotPresent",
        "command": [cfg.python, "-m", AGENT, "-m", module, *args],
        "resources": {"limits": {"nvidia.com/gpu": cfg.nproc}},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{k8s.shm_gb}Gi"}}]
    if k8s.volume_claim:
        container["volumeMounts"].append({"name": "shared", "mountPath": k8s.mount_path})
        volumes.append({"name": "shared",
                        "persistentVolumeClaim": {"claimName": k8s.volume_claim}})
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": job_name(cfg, run_dir), "namespace": k8s.namespace},
        "spec": {
            "elasticPolicy": {"rdzvBackend": "c10d", "rdzvPort": k8s.rdzv_port,
                              "minReplicas": k8s.min_nodes or cfg.nnodes,
                              "maxReplicas": cfg.nnodes, "maxRestarts": cfg.max_restarts,
                              "nProcPerNode": cfg.nproc},
            "pytorchReplicaSpecs": {"Worker": {
                "replicas": cfg.nnodes, "restartPolicy": "OnFailure",
                "template": {"spec": {
                    # Time to finish the step and write the preemption checkpoint.
                    "terminationGracePeriodSeconds": k8s.grace_s,
                    "containers": [container], "volumes": volumes}}}}}}


def manifest(cfg: LauncherConfig, module: str, args: list[str], run_dir: str) -> str:
    """The manifest ``kubectl apply -f`` gets: exactly what ``--dry-run`` prints."""
    return yaml.safe_dump(pytorchjob(cfg, module, args, run_dir), sort_keys=False)
