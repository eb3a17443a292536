"""Every YAML under configs/ composes and validates; bad overrides fail at start, by name."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO
from omegaconf import OmegaConf

from foundation.compose import ConfigError, compose
from foundation.config import TrainConfig
from foundation.recipes import RECIPES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and not p.name.startswith("_"))


def group_options():
    for group in GROUPS:
        for option in sorted((CONFIGS / group).glob("*.yaml")):
            yield group, option.stem


@pytest.mark.parametrize(("group", "option"), list(group_options()))
def test_every_group_option_composes_and_builds(group, option, tmp_path, monkeypatch):
    # Item content comes from the data's item shards: stand in 384-d vectors for every item.
    import foundation.tasks

    monkeypatch.setattr(foundation.tasks, "content_vectors",
                        lambda *args: (torch.randn(101, 384, device="cpu"),
                                       torch.ones(101, dtype=torch.bool, device="cpu")))
    # The item encoder's text tower learns its vocabulary from the item shards: a stand-in.
    from foundation.models.encoders import train_tokenizer
    from foundation.recipes.pretrain_item_encoder import PretrainItemEncoder

    monkeypatch.setattr(PretrainItemEncoder, "tokenizer",
                        lambda self: train_tokenizer(["a tiny catalogue of titles"], 50))
    # Search reads the titles from the item shards too.
    from foundation.recipes.finetune_search import FinetuneSearch

    monkeypatch.setattr(FinetuneSearch, "_title_texts", lambda self: ["a title"] * 101)
    overrides = [f"data.path={tmp_path}", f"run_dir={tmp_path}/run"]
    if group == "experiment":
        overrides.append(f"+experiment={option}")
    else:
        overrides.append(f"{group}={option}")
    cfg = compose("train", overrides)
    OmegaConf.to_object(cfg.trainer)  # typed all the way down
    assert cfg.recipe.name in RECIPES
    # Build the recipe's dense arch on the meta device: shapes come from the config alone.
    task_cls = RECIPES[cfg.recipe.name]
    manifest = {"vocab": {"item": 101}, "items": {"content": {"text": {}, "image": {}, "audio": {}}},
                "totals": {"searches": 300, "sends": 300}}
    task = task_cls(cfg, manifest, torch.ones(101))
    with torch.device("meta"):
        dense = task.build_dense()
        sparse = task.build_sparse(torch.device("meta"))
    assert sum(p.numel() for p in dense.parameters()) > 0
    if task.data_mode == "items":
        return  # the item encoder's towers; it reads an item table only to align with one
    # The item table: sharded (in the sparse arch) or replicated (in the dense arch).
    holder = sparse if cfg.model.item_table == "sharded" else dense
    shapes = {name: tuple(p.shape) for name, p in holder.named_parameters()}
    assert (101, cfg.model.embedding_dim) in [shapes[k] for k in shapes if "item_table" in k]
    if cfg.model.item_content:
        assert set(dense.content.adapters) == {str(m.value) for m in cfg.model.item_content}


@pytest.mark.parametrize("name", ["data_synth", "data_build", "eval", "export"])
def test_command_configs_require_their_paths(name):
    with pytest.raises(ConfigError, match="output|run_dir"):
        compose(name, [])


def test_train_schema_matches_yaml_defaults(tmp_path):
    cfg = compose("train", [f"data.path={tmp_path}"])
    assert OmegaConf.get_type(cfg) is TrainConfig


def test_misspelled_key_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.max_stepz"):
        compose("train", [f"data.path={tmp_path}", "trainer.max_stepz=5"])


def test_every_wrong_override_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        compose("train", [f"data.path={tmp_path}", "trainer.max_stepz=5", "model.attention=linear",
                          "recipe=finetune_ranking", "recipe.init_fromm=x", "seed=1"])
    message = str(err.value)
    assert message.startswith("3 problems")
    for wrong in ("trainer.max_stepz", "'linear', expected one of [softmax, pointwise]",
                  "recipe.init_fromm"):
        assert wrong in message


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.max_steps") as err:
        compose("train", [f"data.path={tmp_path}", "trainer.max_steps=abc"])
    assert "abc" in str(err.value)


def test_recipe_fields_are_typed_too(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe\.num_negatives"):
        compose("train", [f"data.path={tmp_path}", "recipe.num_negatives=many"])
    with pytest.raises(ConfigError, match=r"recipe\.init_fromm"):
        compose("train", [f"data.path={tmp_path}", "recipe=finetune_ranking", "recipe.init_fromm=x"])
    with pytest.raises(ConfigError, match=r"'ful_softmax', expected one of \[sampled_softmax, "
                                          r"full_softmax\]"):  # a choice fails with the choices
        compose("train", [f"data.path={tmp_path}", "recipe.loss=ful_softmax"])



def test_search_queries_read_the_text_tower_only_where_the_model_reads_item_text(tmp_path):
    from foundation.recipes.finetune_search import FinetuneSearch

    search = [f"data.path={tmp_path}", "recipe=finetune_search"]
    with pytest.raises(ConfigError, match=r"auto, ngrams, text_tower"):
        compose("train", [*search, "recipe.query_encoder=minilm"])
    manifest = {"vocab": {"item": 101}, "totals": {"searches": 300}}  # no item text
    auto = FinetuneSearch(compose("train", search), manifest, torch.ones(101))
    assert auto.query_texts is None and "query_text" not in auto.query_inputs(["space"])
    with pytest.raises(ValueError, match=r"add model\.item_content=\[text\]"):
        FinetuneSearch(compose("train", [*search, "recipe.query_encoder=text_tower"]), manifest,
                       torch.ones(101))


def test_token_budget_batches_are_refused_where_the_loss_is_not_a_mean_over_pairs(synth_shards,
                                                                                  tmp_path):
    """finetune_retrieval averages over label events only: data.tokens_per_batch could not
    weight its batches to the global mean, so the run stops before training, naming why."""
    result = subprocess.run([sys.executable, "-m", "foundation.cli", "train",
                             "recipe=finetune_retrieval", f"data.path={synth_shards}",
                             f"run_dir={tmp_path}", "data.tokens_per_batch=1024", *FAST],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "recipe finetune_retrieval does not average its loss" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_path_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path"):
        compose("train", [])
    missing = tmp_path / "nowhere"
    result = subprocess.run([sys.executable, "-m", "foundation.cli", "train", f"data.path={missing}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert str(missing) in result.stderr


def test_cli_reports_a_typo_before_starting(tmp_path):
    result = subprocess.run([sys.executable, "-m", "foundation.cli", "train", f"data.path={tmp_path}",
                             "trainer.max_stepz=5"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "trainer.max_stepz" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_help_lists_groups_and_options():
    result = subprocess.run([sys.executable, "-m", "foundation.cli", "train", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "sharding   auto, column_wise, table_wise" in result.stdout
    assert ("recipe     finetune_notification, finetune_ranking, finetune_retrieval, "
            "finetune_search, pretrain_item_encoder, pretrain_member_fm") in result.stdout


def test_config_changes_name_each_changed_leaf():
    from foundation.config import config_changes

    old = {"trainer": {"max_steps": 4, "optim": {"lr": 0.1}}, "seed": 0}
    new = {"trainer": {"max_steps": 6, "optim": {"lr": 0.1}}, "seed": 0, "extra": 1}
    assert config_changes(old, new) == ["extra: None → 1", "trainer.max_steps: 4 → 6"]
    assert config_changes(old, old) == []


@pytest.mark.parametrize(("command", "override", "allowed"), [
    ("train", "sharding.optimizer=adagard", "rowwise_adagrad, adagrad, sgd, adam"),
    ("train", "sharding.types=[row_wize]", "table_wise, column_wise, row_wise"),
    ("train", "engine.bf16=yes", "auto, on, off"),
    ("data_build", "source.format=parket", "parquet, csv, jsonl, sasrec_txt"),
    ("data_build", "split=loo", "auto, member, leave_one_out, time"),
    ("export", "precisions=[fp8]", "fp32, fp16, int8"),
])
def test_a_typo_in_a_choice_names_the_allowed_values(tmp_path, command, override, allowed):
    required = {"train": [f"data.path={tmp_path}"],
                "data_build": [f"output={tmp_path}", f"source.path={tmp_path}"],
                "export": [f"run_dir={tmp_path}", f"output={tmp_path}/b"]}[command]
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")) as err:
        compose(command, [*required, override])
    assert allowed in str(err.value)


def test_the_cli_starts_without_importing_torchrec_deepspeed_or_checkpointing():
    """Composing and launching reads only the schemas: every command (and ``--help``)
    starts without the heavy libraries, which the ranks import themselves."""
    code = ("import sys, foundation.cli; foundation.cli.main(['recipes']); print(sorted(m for m "
            "in ('torchrec', 'deepspeed', 'torch.distributed.checkpoint') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    assert out.splitlines()[-1] == "[]", out
