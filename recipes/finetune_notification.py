"""Fine-tune for messaging: should this member get a message about this title?

Trained on randomised sends (each candidate message sent or held out at random), the model
learns two heads on the pretrained member state: the outcome without the message and what
sending adds. Policies send to the candidates with the highest predicted uplift, not to those
most likely to respond (who mostly would have played the title anyway)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from foundation.metrics import auc, calibration_error, log_loss
from foundation.metrics.uplift import uplift_metrics
from foundation.models.candidates import TargetAwareScorer
from foundation.models.content import ItemContent
from foundation.models.finetune import FinetuneConfig
from foundation.models.member import ItemAttributes, MemberModelConfig
from foundation.tasks import CandidateTask, register_recipe


@dataclass
class NotificationConfig(FinetuneConfig):
    name: str = "finetune_notification"
    mlp_hidden: int = 128
    budget: float = 0.2  # the share of candidate messages a policy sends (policy values)


class UpliftModel(TargetAwareScorer):
    """Two logits per candidate message: the outcome's if held out, and what sending adds."""

    def __init__(self, model: MemberModelConfig, recipe: NotificationConfig,
                 token_features: tuple[str, ...] | None = None,
                 attributes: ItemAttributes | None = None, content: ItemContent | None = None):
        super().__init__(model, recipe.mlp_hidden, 2, token_features, attributes, content)

    def forward(self, batch, emb: dict[str, Tensor], mode: str = "train") -> Tensor:
        """Training: the loss on both arms. Else ``[candidates, 2]``: the outcome's logit if
        held out and if sent."""
        held, lift = self.logits(batch, emb).unbind(-1)
        if mode == "train":
            logit = held + batch.sent.float() * lift
            return F.binary_cross_entropy_with_logits(logit, batch.labels.float())
        return torch.stack([held, held + lift], -1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


@register_recipe
class FinetuneNotification(CandidateTask):
    name = "finetune_notification"
    config_class = NotificationConfig
    summary = "messaging fine-tune: response and uplift heads on randomised sends (Qini, policy value)"
    data_mode = "notification"
    eval_metric = "qini"
    output_names = ("held", "lift")
    output_meaning = ("P(play | held out) = sigmoid(held), P(play | sent) = sigmoid(held + "
                      "lift); send where the uplift, their difference, is largest")

    def __init__(self, cfg, manifest, item_counts):
        super().__init__(cfg, manifest, item_counts)
        if not manifest.get("totals", {}).get("sends"):
            raise ValueError(f"{cfg.data.path} holds no sends: build it with source.sends_path "
                             f"(member_id, item_id, timestamp, sent, outcome), e.g. the "
                             f"synthetic world's raw/sends.parquet")

    def build_dense(self) -> UpliftModel:
        return UpliftModel(self.cfg.model, self.recipe, self.token_features, *self.item_parts())

    def evaluate(self, model, batches, split=None, calibrate=False):
        """The response head's AUC and calibration on sent messages; Qini, AUUC and policy
        value of the uplift ranking against response-only and random targeting (and, where the
        data knows the true uplift, the share of the oracle policy's value each captures)."""
        def columns(batch, out):
            known = {"uplift": batch.true_uplift} if batch.true_uplift is not None else {}
            return {"held": out[:, 0], "sent_logit": out[:, 1], "sent": batch.sent,
                    "outcome": batch.labels, **known}

        return self._report(self.candidate_columns(model, batches, columns))

    def _report(self, data: dict[str, np.ndarray]) -> dict:
        p_held, p_sent = _sigmoid(data["held"]), _sigmoid(data["sent_logit"])
        sent, outcome = data["sent"].astype(bool), data["outcome"]
        truth = data.get("uplift")  # where the data knows it (a simulator's)
        policies = {"model": p_sent - p_held, "response_only": p_sent,
                    "random": np.random.default_rng(self.cfg.seed).random(len(sent))}
        if truth is not None:
            policies["oracle"] = truth
        budget = self.recipe.budget
        scored = {name: uplift_metrics(scores, sent, outcome, budget, truth)
                  for name, scores in policies.items()}
        metrics = {"response_auc": auc(p_sent[sent], outcome[sent]),
                   "response_log_loss": log_loss(p_sent[sent], outcome[sent]),
                   "response_calibration_error": calibration_error(p_sent[sent], outcome[sent]),
                   **scored.pop("model"), "sends": float(len(sent)),
                   "sent_rate": float(sent.mean()) if len(sent) else float("nan"),
                   "budget": budget}
        scores = {"row_id": data["row_id"].astype(np.int64), "sent": sent, "outcome": outcome,
                  "budget": np.array(budget), "kind": np.array("uplift"),
                  **({"uplift": truth} if truth is not None else {}),
                  **{f"score_{name}": s for name, s in policies.items()}}
        return {"metrics": metrics, "baselines": scored, "scores": scores}
