"""The ``foundation`` command: the front door to every job. Each subcommand takes Hydra
overrides (``key=value``); ``foundation <command> --help`` lists them."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from foundation.compose import ConfigError, compose
from foundation.console import setup_logging
from foundation.launch.config import LauncherName, LaunchError
from foundation.process import exit_without_teardown

log = logging.getLogger(__name__)

USAGE = """\
foundation data synth output=DIR [world.members=N ...]        synthetic member world → shards
foundation data build source.format=F source.path=P output=DIR  event tables → shards
foundation train [--nproc N] [--launcher slurm|k8s|accelerate --nnodes M --dry-run] recipe=NAME
                data.path=DIR run_dir=RUN [...]          train here, or on a cluster
foundation train -m key=a,b other=c,d ... run_dir=RUN             a sweep: RUN/0, RUN/1, ...
foundation eval run_dir=RUN [split=test]                        writes RUN/eval.json
foundation eval compare RUN_A RUN_B|RUN_A@most_popular [--group cold]  offline A/B test
foundation export [--nproc N] run_dir=RUN output=BUNDLE           serving bundle + parity gate
foundation report RUN [RUN ...]                                 validation, speed, plots
foundation plan tables.items.rows=N world_size=R device_memory_gb=G  bytes per rank, fits?
foundation recipes                                              list recipes
foundation demo [--dir DIR]                                     the whole path, end to end
"""

CONFIG_OF = {"synth": "data_synth", "build": "data_build", "train": "train", "eval": "eval",
             "export": "export", "plan": "plan"}


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(prog="foundation", usage=USAGE,
                                     description="Train recommender foundation models.")
    # prog: each command's own usage line ("foundation train [-h] ..."), not the overview's
    sub = parser.add_subparsers(dest="command", required=True, prog="foundation")
    data = sub.add_parser("data", help="write webdataset shards").add_subparsers(
        dest="action", prog="foundation data", required=True)
    for action in ("synth", "build"):
        _with_overrides(data.add_parser(action, help=f"foundation data {action} key=value ..."))
    train = _with_overrides(sub.add_parser(
        "train", help="train a recipe", epilog=_train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter))
    train.add_argument("--launcher", choices=[n.value for n in LauncherName],
                       help="where the job runs (launcher=...; default local): slurm, k8s and "
                            "accelerate write what the cluster runs into RUN/launch/ and submit it")
    train.add_argument("-m", "--multirun", action="store_true",
                       help="a sweep: key=a,b other=c,d runs each combination in RUN/0, RUN/1, "
                            "... (foundation report RUN tabulates them)")
    train.add_argument("--dry-run", action="store_true",
                       help="print the command, sbatch script, manifest or accelerate config, "
                            "and submit nothing")
    train.add_argument("--nproc", type=int, help="processes (GPUs) per node (launcher.nproc)")
    train.add_argument("--nnodes", type=int, help="nodes in the job (launcher.nnodes)")
    train.add_argument("--node-rank", type=int,
                       help="this node's index (accelerate; torchrun's rendezvous assigns it)")
    train.add_argument("--master-addr", help="node 0's address (local, accelerate)")
    train.add_argument("--master-port", type=int, help="the rendezvous port on node 0")
    train.add_argument("--max-restarts", type=int, help="torchrun restarts after a failure")
    _with_overrides(sub.add_parser("eval", help="evaluate a run: RUN/eval.json"))
    export = _with_overrides(sub.add_parser(
        "export", help="export a member model to a serving bundle (docs/serving.md)",
        description="Write BUNDLE (model.pt2, model.onnx, embeddings/*.safetensors, "
                    "manifest.json, ann/) from a run's checkpoint; the parity gate compares "
                    "the sharded model with the bundle served by torch and onnxruntime and "
                    "writes nothing if they disagree. Keys: run_dir, output, checkpoint="
                    "auto|latest|best|step-N (auto: the best after early stopping, else the newest), precisions=[fp32,fp16,int8], ann=true|false, "
                    "parity_batches, max_abs_diff, overwrite."))
    export.add_argument("--nproc", type=int, default=1, help="ranks to load the model on")
    _with_overrides(sub.add_parser(
        "plan", help="will the tables and dense state fit? bytes per rank",
        description="TorchRec's planner on the meta device (nothing allocated) places the "
                    "tables over world_size devices; prints the plan and, per rank, the bytes "
                    "of its table shards and their optimizer state, its ZeRO partition of the "
                    "dense state, the loss's scoring buffers and an activation estimate; exits "
                    "2 when they do not fit. Keys: tables.NAME.rows, tables.NAME.dim, "
                    "world_size, ranks_per_node, device=cuda|cpu, device_memory_gb, "
                    "batch_size, loss=sampled_softmax|full_softmax, num_negatives, model.*, "
                    "engine.zero_stage, sharding.types, sharding.optimizer."))
    runs = sub.add_parser(
        "report", help="what runs reached and cost: validation, tokens/s, MFU, memory",
        description="One run: its best validation, tokens/s, MFU, the share of step time "
                    "waiting for data and in collectives, peak memory per rank, and "
                    "RUN/training.png redrawn. Several runs (a sweep): one table.")
    runs.add_argument("runs", nargs="+", help="run directories of finished training runs")
    sub.add_parser("recipes", help="list the recipes")
    demo = sub.add_parser("demo", help="synth → pretrain (2 ranks) → fine-tune → eval")
    demo.add_argument("--dir", default="demo")
    demo.add_argument("--nproc", type=int, default=2)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["eval", "compare"]:
        return _compare(argv[2:])
    args = parser.parse_args(_overrides_last(argv))
    try:
        return _dispatch(args)
    except Exception as err:
        if not isinstance(err, _reported_errors()):
            raise
        log.error(err)
        return 2


def _reported_errors() -> tuple[type[Exception], ...]:
    """The errors a command reports in one line. Imported only on failure: their modules pull
    in torch.distributed.checkpoint, which a launching process never needs."""
    from foundation.export.exporter import ExportError
    from foundation.train.checkpoint import CheckpointError

    return (ConfigError, LaunchError, CheckpointError, ExportError, FileNotFoundError,
            FileExistsError)


# The flags that take a value: the word after one of them is never an override.
VALUED = {"--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port",
          "--max-restarts", "--launcher", "--dir"}


def _overrides_last(argv: list[str]) -> list[str]:
    """Hydra overrides (``key=value``, ``+key=``, ``~key``) after the flags, so that flags may
    follow overrides (argparse stops taking positionals at the first flag)."""
    flags, overrides = [], []
    for i, word in enumerate(argv):
        is_value = i > 0 and argv[i - 1] in VALUED
        is_override = ("=" in word and not word.startswith("-")) or word.startswith("~")
        (overrides if is_override and not is_value else flags).append(word)
    return flags + overrides


def _compare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="foundation eval compare",
        description="Offline A/B test: per metric, the paired difference B − A over users with "
                    "a 95%% bootstrap confidence interval and a verdict (recipes scoring given "
                    "candidates, ranking and notification: metrics recomputed on resampled "
                    "members). Both runs must be evaluated (foundation eval) on the same split "
                    "first.")
    parser.add_argument("a", help="run dir A, or RUN@BASELINE (e.g. runs/x@most_popular)")
    parser.add_argument("b", help="run dir B, or RUN@BASELINE")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--output", help="also write the comparison as JSON here")
    parser.add_argument("--group", help="compare only the users of a group: cold (their "
                                        "target is a cold item) or warm; needs a cold_items build")
    args = parser.parse_args(argv)
    from foundation.eval.compare import run_compare

    try:
        run_compare(args.a, args.b, resamples=args.resamples, seed=args.seed, output=args.output,
                    group=args.group)
    except (FileNotFoundError, KeyError, ValueError) as err:
        log.error(err)
        return 2
    return 0


def _train_epilog() -> str:
    """The config groups and their options, read from the installed config tree."""
    from importlib.resources import files

    root = files("foundation.configs")
    lines = ["config groups (pick with group=option):"]
    for group in sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        options = sorted(p.name[:-5] for p in (root / group).iterdir() if p.name.endswith(".yaml"))
        lines.append(f"  {group:10s} {', '.join(options)}")
    lines += ["", "common overrides: seed=0 run_dir=RUN data.path=DIR trainer.max_steps=N",
              "  trainer.checkpoint_every=N trainer.resume=auto|never|PATH engine=deepspeed|fsdp",
              "  engine.zero_stage=0-3 (deepspeed)",
              "  recipe.init_from=RUN (fine-tunes) sharding.types=[table_wise,column_wise]",
              "see every key: foundation train --cfg recipe=NAME data.path=DIR"]
    return "\n".join(lines)


def _with_overrides(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, key=value")
    parser.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "recipes":
        from foundation.recipes import RECIPES

        for name, task in sorted(RECIPES.items()):
            print(f"{name:24s} {task.summary}")
        return 0
    if args.command == "report":
        from pathlib import Path

        from foundation.train.report import report

        report([Path(run) for run in args.runs])
        return 0
    if args.command == "demo":
        from foundation.demo import run_demo

        return run_demo(args.dir, nproc=args.nproc)
    name = CONFIG_OF[args.action if args.command == "data" else args.command]
    if args.command == "train":
        args.overrides = [*_launcher_overrides(args), *args.overrides]
        if args.multirun:
            from foundation.launch.sweep import run_sweep

            return run_sweep(args.overrides, dry_run=args.dry_run)
    cfg = compose(name, args.overrides)  # validates before anything starts
    if args.cfg:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return 0
    if args.command == "data":
        from foundation.data import commands

        return (commands.run_synth if args.action == "synth" else commands.run_build)(cfg) or 0
    if args.command == "eval":
        from foundation.eval.run import evaluate_run

        evaluate_run(cfg)
        return 0
    if args.command == "export":
        return _export(args, cfg)
    if args.command == "plan":
        from foundation.distributed.planning import run_plan

        return run_plan(cfg)
    return _train(args, cfg)


def _export(args: argparse.Namespace, cfg) -> int:
    if args.nproc == 1:
        from foundation.export.exporter import export_run

        export_run(cfg)
        return 0
    from foundation.launch.config import LauncherConfig
    from foundation.launch.torchrun import run_local

    return run_local(LauncherConfig(nproc=args.nproc), "foundation.export", args.overrides)


def _launcher_overrides(args: argparse.Namespace) -> list[str]:
    """The launcher flags as overrides (the config records how the run was launched)."""
    group = [f"launcher={args.launcher}"] if args.launcher else []
    keys = {"nproc": args.nproc, "nnodes": args.nnodes, "node_rank": args.node_rank,
            "master_addr": args.master_addr, "master_port": args.master_port,
            "max_restarts": args.max_restarts}
    return group + [f"launcher.{key}={value}" for key, value in keys.items() if value is not None]


def _train(args: argparse.Namespace, cfg) -> int:
    launcher = cfg.launcher
    if launcher.name == LauncherName.local and not args.dry_run:
        from foundation.data.writer import load_manifest

        load_manifest(cfg.data.path)  # a missing data path fails here, not in N ranks
        if launcher.nproc * launcher.nnodes == 1 and launcher.max_restarts == 0:
            from foundation.train.__main__ import main as train_main

            return train_main(args.overrides)
    from foundation.launch.launcher import launch

    return launch(cfg, args.overrides, dry_run=args.dry_run)


def run() -> NoReturn:
    """The ``foundation`` console script: ``main``, then the process ends without the
    interpreter's teardown (foundation/process.py)."""
    exit_without_teardown(main())


if __name__ == "__main__":
    run()
