"""A recipe is one module plus one YAML: written outside the package (``FOUNDATION_RECIPES``),
it is listed, trains and evaluates with no other change."""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import FAST, foundation

MODULE = '''
from dataclasses import dataclass

from foundation.recipes.pretrain_member_fm import PretrainConfig, PretrainMemberFM
from foundation.tasks import register_recipe


@dataclass
class RecentConfig(PretrainConfig):
    name: str = "recent_items"


@register_recipe
class RecentItems(PretrainMemberFM):
    """Next-item prediction, evaluated among the whole catalogue (history kept)."""

    name = "recent_items"
    config_class = RecentConfig
    summary = "a recipe written in a test: next item, history kept among the candidates"
'''

YAML = """
defaults:
  - recent_items_schema
  - _self_

name: recent_items
exclude_history: false
"""


@pytest.mark.slow
def test_a_recipe_outside_the_package_is_listed_trains_and_evaluates(synth_shards, tmp_path,
                                                                     monkeypatch):
    recipes = tmp_path / "my_recipes"
    (recipes / "recipe").mkdir(parents=True)
    (recipes / "recent_items.py").write_text(textwrap.dedent(MODULE))
    (recipes / "recipe/recent_items.yaml").write_text(YAML)
    monkeypatch.setenv("FOUNDATION_RECIPES", str(recipes))
    listed = foundation("recipes")
    assert "recent_items" in listed and "a recipe written in a test" in listed
    assert "pretrain_member_fm" in listed  # the package's own recipes stay
    run = tmp_path / "run"
    foundation("train", "recipe=recent_items", f"data.path={synth_shards}", f"run_dir={run}",
               "trainer.max_steps=3", "trainer.eval_every=0", "trainer.eval_batches=1", *FAST)
    foundation("eval", f"run_dir={run}", "split=val")
    report = json.loads((run / "eval.json").read_text())
    assert report["recipe"] == "recent_items" and report["metrics"]["hr@10"] >= 0
    typo = foundation("train", "recipe=recent_items", f"data.path={synth_shards}",
                      f"run_dir={run}", "recipe.exclude_histori=true", check=False)
    assert typo.returncode == 2 and "recipe.exclude_histori" in typo.stderr
