"""The summary of ``bench/speed.sh OUT``: test HR@10 against training time for the framework
(its checkpoints) and the reference script (its epochs), the ratio of training times to reach
test HR@10 ``--target``, the ratio of training events/s, and the framework's data waiting.
Writes OUT/speed.json and OUT/speed.png.

    python bench/speed_report.py OUT [--target 0.09]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger("speed")


def framework_curve(run: Path) -> list[dict[str, float]]:
    """(training seconds, test HR@10, NDCG@10) at each evaluated checkpoint."""
    seconds = {row["step"]: row["train_seconds"]
               for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "train_seconds" in row}
    curve = []
    for path in sorted(run.glob("eval-test-step-*.json"),
                       key=lambda p: int(p.stem.rsplit("-", 1)[1])):
        step = int(path.stem.rsplit("-", 1)[1])
        metrics = json.loads(path.read_text())["metrics"]
        curve.append({"step": step, "train_s": seconds[step], "hr@10": metrics["hr@10"],
                      "ndcg@10": metrics["ndcg@10"]})
    return curve


def reference_curve(lines: Path) -> tuple[list[dict[str, float]], float]:
    """The reference's (training seconds, test HR@10, NDCG@10) per epoch, and its mean
    training events/s."""
    rows = [json.loads(line) for line in lines.read_text().splitlines() if line.startswith("{")]
    curve = [{"epoch": r["epoch"], "train_s": r["train_s"], "hr@10": r["test_hr10"],
              "ndcg@10": r["test_ndcg10"]} for r in rows]
    return curve, sum(r["train_events_per_s"] for r in rows) / len(rows)


def time_to(curve: list[dict[str, float]], target: float) -> float | None:
    """Training seconds at the first point whose test HR@10 reaches ``target``."""
    return next((point["train_s"] for point in curve if point["hr@10"] >= target), None)


def target_positions_per_s(run: Path) -> tuple[float, float]:
    """The framework's training target positions/s (events less each row's first, as the
    reference counts them) and its data-waiting share, from summary.json and the manifest."""
    telemetry = json.loads((run / "summary.json").read_text())["telemetry"]
    data = Path(OmegaConf.load(run / "config.yaml").data.path)
    train = json.loads((data / "manifest.json").read_text())["splits"]["train"]
    pairs_per_event = 1 - train["samples"] / train["events"]
    return telemetry["tokens_per_s"] * pairs_per_event, telemetry["data_wait_share"]


def plot(out: Path, framework: list[dict], reference: list[dict], target: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    for name, curve in (("framework (2 ranks)", framework), ("padded SASRec script", reference)):
        axis.plot([p["train_s"] for p in curve], [p["hr@10"] for p in curve], marker="o",
                  label=name)
    axis.axhline(target, ls="--", color="grey")
    axis.set(xlabel="training seconds (evaluation excluded)", ylabel="test HR@10")
    axis.legend()
    fig.tight_layout()
    path = out / "speed.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the OUT_DIR of bench/speed.sh")
    parser.add_argument("--target", type=float, default=0.09, help="test HR@10 to reach")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    framework = framework_curve(args.out / "framework")
    reference, reference_eps = reference_curve(args.out / "reference.jsonl")
    framework_eps, data_wait = target_positions_per_s(args.out / "framework")
    for name, curve in (("framework", framework), ("reference", reference)):
        log.info("%s: %s", name, ", ".join(f"{p['train_s']:.0f}s {p['hr@10']:.4f}" for p in curve))
    reached = {name: time_to(curve, args.target)
               for name, curve in (("framework", framework), ("reference", reference))}
    summary = {
        "target_hr@10": args.target, "seconds_to_target": reached,
        "time_ratio": (reached["framework"] / reached["reference"]
                       if None not in reached.values() else None),
        "events_per_s": {"framework": framework_eps, "reference": reference_eps},
        "events_ratio": framework_eps / reference_eps, "framework_data_wait_share": data_wait,
        "final_test_hr@10": {"framework": framework[-1]["hr@10"],
                             "reference": max(p["hr@10"] for p in reference)},
        "framework": framework, "reference": reference}
    (args.out / "speed.json").write_text(json.dumps(summary, indent=2))
    figure = plot(args.out, framework, reference, args.target)
    ratio = summary["time_ratio"]
    log.info("time to test HR@10 %.2f: framework %s s, reference %s s (ratio %s); training "
             "events/s %.0f vs %.0f (%.2f×); data wait %.1f%% | %s, %s", args.target,
             reached["framework"], reached["reference"],
             "n/a" if ratio is None else f"{ratio:.2f}", framework_eps, reference_eps,
             summary["events_ratio"], 100 * data_wait, args.out / "speed.json", figure)


if __name__ == "__main__":
    main()
