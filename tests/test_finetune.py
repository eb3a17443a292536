"""Fine-tune modes (foundation/models/finetune.py), warm-start allow-lists and retrieval's
held-out targets: the pieces, on real modules. The trained recipes are in test_training.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from foundation.data.batch import SequenceBatch
from foundation.models.finetune import (
    FinetuneConfig,
    FinetuneMode,
    LoraConfig,
    PartialConfig,
    apply_finetune,
    merge_adapters,
)
from foundation.models.member import EventEncoder, MemberModelConfig
from foundation.tasks import split_at_last
from foundation.train import checkpoint


def pretrained() -> nn.ModuleDict:
    torch.manual_seed(0)
    cfg = MemberModelConfig(embedding_dim=32, num_heads=2, num_layers=2, dropout=0.0)
    return nn.ModuleDict({"encoder": EventEncoder(cfg, ("item",)), "head": nn.Linear(32, 1)})


def encode(model: nn.ModuleDict, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model["head"](model["encoder"].encode_padded(tokens, mask)).squeeze(-1)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.arange(6).unsqueeze(0) < torch.tensor([[6], [3], [1], [5]])
    return tokens, mask


def train_a_step(model: nn.Module) -> None:
    tokens, mask = inputs()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    encode(model, tokens, mask).square().mean().backward()
    optimizer.step()


def test_lora_starts_at_the_pretrained_model_trains_only_adapters_and_merges_exactly():
    model = pretrained().eval()
    tokens, mask = inputs()
    before = encode(model, tokens, mask).detach()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    tuning = apply_finetune(model, FinetuneConfig(mode=FinetuneMode.lora), ("head.",),
                            table_params=10_000)
    assert torch.equal(encode(model, tokens, mask), before)  # up = 0: nothing changed yet
    assert not tuning.tables_train and tuning.trainable < 0.2 * tuning.total
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("head.") or n.endswith((".up", ".down")) for n in trained)
    # nn.MultiheadAttention reads in_proj_weight directly: the adapter must reach it too
    assert any("self_attn.parametrizations.in_proj_weight" in n for n in trained)
    train_a_step(model)
    adapted = encode(model, tokens, mask).detach()
    assert not torch.allclose(adapted, before)
    for key, value in model.state_dict().items():  # pretrained matrices: bit-identical
        plain = key.replace("parametrizations.", "").replace(".original", "")
        if key.endswith(".original") or (plain in frozen and "parametrizations" not in key):
            assert torch.equal(value, frozen[plain]), key
    assert merge_adapters(model) == 8  # 2 layers × (in_proj, out_proj, linear1, linear2)
    assert not any("parametrizations" in k for k in model.state_dict())
    torch.testing.assert_close(encode(model, tokens, mask), adapted, atol=1e-5, rtol=1e-5)


def test_freeze_trains_the_head_only_and_partial_names_what_matched():
    model = pretrained()
    encoder = {k: v.clone() for k, v in model["encoder"].state_dict().items()}
    tuning = apply_finetune(model, FinetuneConfig(mode=FinetuneMode.freeze), ("head.",), 500)
    assert tuning.trainable == 33 and tuning.total == 500 + sum(
        p.numel() for p in model.parameters())
    train_a_step(model)
    assert all(torch.equal(v, encoder[k]) for k, v in model["encoder"].state_dict().items())

    partial = FinetuneConfig(mode=FinetuneMode.partial,
                             partial=PartialConfig(trainable=["encoder.output_norm.*", "tables"]))
    tuning = apply_finetune(pretrained(), partial, ("head.",), 500)
    assert tuning.tables_train and tuning.trainable == 33 + 64 + 500
    typo = FinetuneConfig(mode=FinetuneMode.partial,
                          partial=PartialConfig(trainable=["encoder.ouput_norm.*"]))
    with pytest.raises(ValueError, match=r"ouput_norm.*match no parameter.*encoder\.position"):
        apply_finetune(pretrained(), typo, ("head.",), 0)
    with pytest.raises(ValueError, match="match no matrix"):
        apply_finetune(pretrained(), FinetuneConfig(mode=FinetuneMode.lora,
                                                    lora=LoraConfig(targets=["decoder.*"])),
                       ("head.",), 0)


def test_a_lora_head_trains_through_its_update_only():
    model = pretrained()
    settings = FinetuneConfig(mode=FinetuneMode.lora, lora=LoraConfig(rank=1, targets=["head.*"]))
    apply_finetune(model, settings, ("head.",), 0)
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trained == ["head.bias", "head.parametrizations.weight.0.down",
                       "head.parametrizations.weight.0.up"]


def test_warm_start_refuses_keys_outside_the_recipes_allow_lists(tmp_path):
    source = pretrained()
    weights = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file({**weights, "extra.weight": torch.zeros(2)}, str(tmp_path / "dense.safetensors"))
    target = pretrained()
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"unexpected \['extra\.weight'\]"):
        checkpoint.load_dense(tmp_path, target, new=("head.",))
    checkpoint.load_dense(tmp_path, target, new=("head.",), unused=("extra.",))
    grown = nn.ModuleDict({**pretrained(), "member_head": nn.Linear(32, 32)})
    with pytest.raises(checkpoint.CheckpointMismatch,
                       match=r"missing \['member_head\.bias', 'member_head\.weight'\]"):
        checkpoint.load_dense(tmp_path, grown, unused=("extra.",))
    checkpoint.load_dense(tmp_path, grown, new=("member_head.",), unused=("extra.",))
    assert torch.equal(grown["encoder"].position.weight, source["encoder"].position.weight)


def test_retrieval_holds_out_each_members_newest_label_event():
    batch = SequenceBatch(sample_ids=torch.tensor([7, 8, 9]), lengths=torch.tensor([3, 2, 4]),
                          item=torch.arange(1, 10), timestamp=torch.arange(9),
                          events={"action": torch.tensor([1, 2, 1, 2, 1, 1, 2, 2, 1])})
    history, targets = split_at_last(batch, batch.events["action"] == 2)
    # member 8's only label is its first event: nothing before it to predict from
    assert history.sample_ids.tolist() == [7, 9] and targets.tolist() == [2, 8]
    assert history.lengths.tolist() == [1, 2] and history.item.tolist() == [1, 6, 7]
    assert history.events["action"].tolist() == [1, 1, 2]


def test_a_partial_checkpoint_refuses_a_missing_or_replaced_base(tmp_path):
    def committed(path, config_hash, **state):
        path.mkdir(parents=True)
        (path / "trainer_state.json").write_text(json.dumps(
            {"step": 3, "config_hash": config_hash, **state}))
        (path / checkpoint.COMMIT_MARKER).write_text("{}")
        return path

    base = committed(tmp_path / "pre/checkpoints/step-3", "aaa")
    tuned = committed(tmp_path / "lora/checkpoints/step-3", "bbb",
                      base=checkpoint.base_pointer(base))
    assert checkpoint.base_of(tuned) == base.resolve()
    assert checkpoint.base_of(base) is None
    (base / "trainer_state.json").write_text(json.dumps({"step": 3, "config_hash": "ccc"}))
    with pytest.raises(checkpoint.CheckpointMismatch, match="overwritten by a different run"):
        checkpoint.base_of(tuned)
    shutil.rmtree(tmp_path / "pre")
    with pytest.raises(FileNotFoundError, match=r"base checkpoint .*pre/checkpoints/step-3.* gone"):
        checkpoint.base_of(tuned)
