"""``foundation demo`` (``make demo``): the paved path end to end on a synthetic world.

synthetic shards (a fifth of the titles held out of training: cold items, known only by
their titles) → pretrain on N ranks (torchrun), reading item text → two downstream recipes
warm-started from it, each against the same recipe from scratch at equal steps: ranking
(full fine-tune) and retrieval (LoRA) → evaluation on held-out members (cold-target users
apart) →
export of the pretrained model to a serving bundle (parity-checked) → recommendations served
from that bundle, and a brand-new title added to it → a short summary.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

# A fifth of the titles never appears in training (cold: scored on test); a tenth more
# appears only in validation, where the model calibrates how new titles rank.
WORLD = ["world.members=3000", "world.items=1000", "world.seed=0", "world.cold_items=0.2",
         "world.cold_val_items=0.1"]
COMMON = ["logger.log_every=20", "data.num_workers=1"]
MODEL = ["model.item_content=[text]", "model.id_dropout=0.3", "model.content_match=true"]
PRETRAIN = ["recipe=pretrain_member_fm", "trainer.max_steps=300", "trainer.eval_every=100",
            "trainer.eval_batches=4", *MODEL]
# Ranking reads items as the pretrain does (content included): the same model settings.
# Pretrained tables want a gentler sparse learning rate than tables learned from scratch.
FINETUNE = ["recipe=finetune_ranking", "trainer.max_steps=150", "trainer.eval_every=0",
            "sharding.lr=0.01", *MODEL]
# The "what to watch next" row of a surface that counts completions on TV.
# Retrieval keeps the whole pretrained model, content included: the same model settings.
RETRIEVAL = ["recipe=finetune_retrieval", "trainer.max_steps=40", "trainer.eval_every=0",
             "recipe.labels.action=[complete]", "+recipe.labels.device=[tv]", *MODEL]


def run_demo(directory: str, nproc: int = 2) -> int:
    root = Path(directory)
    shards, pretrain = root / "shards", root / "runs/pretrain"
    finetune, scratch = root / "runs/finetune", root / "runs/finetune_scratch"
    retrieval, retrieval_scratch = root / "runs/retrieval", root / "runs/retrieval_scratch"
    bundle = root / "bundle"
    start = time.perf_counter()
    steps = [
        ["data", "synth", f"output={shards}", *WORLD],
        ["train", f"--nproc={nproc}", *PRETRAIN, *COMMON, f"data.path={shards}",
         f"run_dir={pretrain}"],
        ["train", f"--nproc={nproc}", *FINETUNE, *COMMON, f"data.path={shards}",
         f"run_dir={finetune}", f"recipe.init_from={pretrain}"],
        # The same recipe from scratch, for the value of pretraining at equal steps.
        ["train", f"--nproc={nproc}", *FINETUNE, *COMMON, f"data.path={shards}",
         f"run_dir={scratch}"],
        ["train", f"--nproc={nproc}", *RETRIEVAL, *COMMON, f"data.path={shards}",
         f"run_dir={retrieval}", f"recipe.init_from={pretrain}", "recipe.mode=lora"],
        ["train", f"--nproc={nproc}", *RETRIEVAL, *COMMON, f"data.path={shards}",
         f"run_dir={retrieval_scratch}"],
        *[["eval", f"run_dir={run}", "split=test"]
          for run in (pretrain, finetune, scratch, retrieval, retrieval_scratch)],
        ["export", f"--nproc={nproc}", f"run_dir={pretrain}", f"output={bundle}",
         "overwrite=true"],
        # The ranking fine-tune serves too: a candidate scorer of its own, parity-gated.
        ["export", f"--nproc={nproc}", f"run_dir={finetune}", f"output={root / 'ranking_bundle'}",
         "overwrite=true", "precisions=[fp32]"],
    ]
    for args in steps:
        log.info(f"\n$ foundation {' '.join(args)}")
        code = subprocess.call([sys.executable, "-m", "foundation.cli", *args])
        if code != 0:
            log.error(f"demo failed at: foundation {' '.join(args)} (exit {code})")
            return code
    pre = json.loads((pretrain / "eval.json").read_text())
    fine = json.loads((finetune / "eval.json").read_text())
    cold = json.loads((scratch / "eval.json").read_text())
    minutes = (time.perf_counter() - start) / 60
    log.info("\n== demo summary ==")
    log.info(f"pretrain  test hr@10 {pre['metrics']['hr@10']:.4f} ndcg@10 {pre['metrics']['ndcg@10']:.4f}"
             f" | most-popular hr@10 {pre['baselines']['most_popular']['hr@10']:.4f} | {pretrain}")
    log.info(f"finetune  test auc {fine['metrics']['auc']:.4f} log_loss {fine['metrics']['log_loss']:.4f}"
             f" | from scratch auc {cold['metrics']['auc']:.4f}"
             f" | most-popular auc {fine['baselines']['most_popular']['auc']:.4f} | {finetune}")
    _retrieval_line(retrieval, retrieval_scratch)
    cold_users = pre["groups"]["cold"]
    log.info(f"cold      users whose next title never appeared in training "
             f"({int(cold_users['metrics']['users'])}): ndcg@10 {cold_users['metrics']['ndcg@10']:.4f}"
             f" | content-knn {cold_users['baselines']['content_knn']['ndcg@10']:.4f}"
             f" | most-popular {cold_users['baselines']['most_popular']['ndcg@10']:.4f}")
    log.info(f"plots: {pretrain}/training.png {finetune}/training.png")
    _serve_from(bundle, shards)
    log.info(f"demo finished in {minutes:.1f} min; shards in {shards}")
    return 0


def _retrieval_line(run: Path, scratch: Path) -> None:
    lora, cold = (json.loads((r / "eval.json").read_text()) for r in (run, scratch))
    share = json.loads((run / "summary.json").read_text())["parameters"]
    log.info(f"retrieval test hr@10 {lora['metrics']['hr@10']:.4f} (LoRA: "
             f"{share['trainable'] / share['total']:.1%} of the parameters trained; through "
             f"the ANN index {lora['metrics']['ann_hr@10']:.4f}) | from scratch "
             f"{cold['metrics']['hr@10']:.4f} | most-popular "
             f"{lora['baselines']['most_popular']['hr@10']:.4f} | {run}")


def _serve_from(bundle: Path, shards: Path, members: int = 3) -> None:
    """A few test members' recommendations, served from the bundle (torch backend)."""
    import numpy as np

    from foundation.data.loader import build_loader
    from foundation.export import History, load_bundle

    predictor = load_bundle(bundle)
    parity = predictor.manifest["parity"]["backends"]
    log.info(f"bundle    {bundle}: parity max|Δ| torch {parity['torch']['max_abs_diff']:.1e} "
             f"onnx {parity['onnx']['max_abs_diff']:.1e}")
    raw_ids = np.load(shards / "item_ids.npy", allow_pickle=False)
    batch = next(iter(build_loader(str(shards), "test", batch_size=members, max_len=50,
                                   num_workers=0)))
    starts = np.cumsum(batch.lengths.numpy()) - batch.lengths.numpy()
    for row, (start, n) in enumerate(zip(starts, batch.lengths.numpy())):
        items = raw_ids[batch.item[start:start + n].numpy()]
        events = slice(start, start + n - 1)  # everything but the newest: the member's past
        history = History(items=items[:-1].tolist(), timestamps=batch.timestamp[events].tolist(),
                          **{name: batch.events[name][events].tolist()
                             for name in predictor.schema.stored})
        top = predictor.recommend(history, k=5)
        hit = "hit" if items[-1] in top else "miss"
        log.info(f"member {int(batch.sample_ids[row])}: last played {items[-4:-1].tolist()} → "
                 f"recommended {top} (next played: {items[-1]}, {hit})")
    _add_a_title(predictor, history, shards)


def _add_a_title(predictor, history, shards: Path) -> None:
    """A title released after the export, described by its text only, served at once."""
    titles = dict(line.split("\t") for line in
                  (shards / "raw/item_text.tsv").read_text().splitlines()[1:])
    text = f"{titles[str(history.items[-1])]}: the sequel"
    new_id = int(predictor.item_ids.max()) + 1
    predictor.add_items({new_id: {"text": text}})
    top = predictor.recommend(history, k=20)
    place = f"#{top.index(new_id) + 1} of 20" if new_id in top else "outside the top 20"
    log.info(f"new title {new_id} {text!r}, added to the bundle after export → {place} for the "
             f"last member, whose newest title was {history.items[-1]}")
