"""``foundation data synth`` and ``foundation data build``: composed config in, shards out."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from foundation.data.configs import BuildCommandConfig, SynthCommandConfig
from foundation.data.ray_build import build_shards_ray
from foundation.data.synthetic import synthesize
from foundation.data.writer import BuildConfig, BuildEngine, build_shards

log = logging.getLogger(__name__)


def _typed(cfg: DictConfig | Any, schema: type) -> Any:
    """The composed config as its dataclass (also accepts a plain DictConfig or dataclass)."""
    if isinstance(cfg, schema):
        return cfg
    merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ValueError(f"missing required value(s): {', '.join(missing)} "
                         f"(pass them as overrides, e.g. {missing[0]}=DIR)")
    return OmegaConf.to_object(merged)


def _summary(verb: str, output: str, manifest: dict[str, Any]) -> str:
    splits = ", ".join(f"{name} {s['samples']} samples/{len(s['shards'])} shards"
                       for name, s in manifest["splits"].items())
    totals = manifest["totals"]
    content = ", ".join(f"{kind} for {c['items']} items"
                        for kind, c in (manifest.get("items") or {}).get("content", {}).items())
    cold = (manifest.get("cold_items") or {}).get("count", 0)
    val_cold = (manifest.get("cold_val_items") or {}).get("count", 0)
    skipped = ((manifest.get("items") or {}).get("skipped") or {}).get("count", 0)
    extra = (f"; item content: {content}" if content else "") + (
        f"; {skipped} unreadable media files skipped" if skipped else "") + (
        f"; {cold} cold items held out of train/val" if cold else "") + (
        f"; {val_cold} held out of train only" if val_cold else "")
    return (f"{verb} {totals['members']} members, {totals['events']} events, "
            f"{totals['items']} items, {totals['impressions']} impressions, "
            f"{totals.get('searches', 0)} searches, {totals.get('sends', 0)} sends → {output} "
            f"({splits}{extra})")


def run_synth(cfg: DictConfig | SynthCommandConfig) -> int:
    cmd: SynthCommandConfig = _typed(cfg, SynthCommandConfig)
    world = dataclasses.replace(cmd.world, output=cmd.output)
    manifest = synthesize(world, progress=cmd.progress)
    log.info(_summary("synthesized", cmd.output, manifest))
    return 0


def run_build(cfg: DictConfig | BuildCommandConfig) -> int:
    cmd: BuildCommandConfig = _typed(cfg, BuildCommandConfig)
    fields = {f.name: getattr(cmd, f.name) for f in dataclasses.fields(BuildConfig)}
    build = build_shards_ray if cmd.engine == BuildEngine.ray else build_shards
    manifest = build(BuildConfig(**fields), progress=cmd.progress)
    log.info(_summary("built", cmd.output, manifest))
    return 0
