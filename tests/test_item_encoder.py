"""Item encoders: media in item shards, the towers, and CLIP-style alignment across ranks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, foundation, run_torchrun

from foundation.compose import compose
from foundation.data.commands import run_synth
from foundation.data.items import iter_items
from foundation.data.media import MediaError
from foundation.data.writer import BuildConfig, build_shards
from foundation.models.encoders import (
    AudioTower,
    AudioTowerConfig,
    ImageTower,
    ImageTowerConfig,
    TextTransformerConfig,
    TextTransformerTower,
    VectorProjection,
    log_mel,
    mel_filterbank,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def media_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("media_world")
    run_synth(compose("data_synth", [f"output={out}", "world.members=300", "world.items=300",
                                     "progress=false"]))
    return out


def _rebuild(world: Path, media: Path, out: Path, on_error: str) -> dict:
    source = {"format": "parquet", "path": str(world / "raw/events.parquet"),
              "item_text_path": str(world / "raw/item_text.tsv"), "item_media_dir": str(media)}
    from foundation.data.sources import SourceConfig

    return build_shards(BuildConfig(source=SourceConfig(**source), output=str(out),
                                    on_error=on_error))


def test_media_enter_item_shards_and_bad_files_fail_or_are_counted(media_world, tmp_path):
    manifest = json.loads((media_world / "manifest.json").read_text())
    assert manifest["items"]["content"] == {"text": {"items": 300}, "image": {"items": 300},
                                            "audio": {"items": 300}}
    item = next(iter_items(media_world, manifest))
    assert item["image"].shape == (32, 32, 3) and item["image"].dtype == np.uint8
    samples, rate = item["audio"]
    assert rate == 8000 and samples.dtype == np.float32 and len(samples) == 4000
    media = tmp_path / "media"
    shutil.copytree(media_world / "raw/media", media)
    (media / "7.png").write_bytes(b"\x89PNG not really")  # corrupt
    (media / "8.wav").write_bytes(b"RIFF....WAVEfmt ")  # truncated
    (media / "poster.png").write_bytes((media / "9.png").read_bytes())  # not ITEM_ID.ext
    from PIL import Image

    Image.new("RGB", (4097, 4097)).save(media / "10.png")  # beyond the pixel limit
    with pytest.raises(MediaError, match=r"10\.png.*pixel limit.*on_error=skip"):
        _rebuild(media_world, media, tmp_path / "raise", "raise")
    assert not (tmp_path / "raise" / "manifest.json").exists()
    built = _rebuild(media_world, media, tmp_path / "skip", "skip")
    skipped = built["items"]["skipped"]
    assert skipped["count"] == 4
    assert {f.split(":")[0] for f in skipped["files"]} == {"7.png", "8.wav", "poster.png", "10.png"}
    assert built["items"]["content"]["image"]["items"] == 298  # 7 and 10 left out
    assert built["items"]["content"]["audio"]["items"] == 299


def test_every_tower_runs_forward_and_backward_on_small_inputs(media_world):
    manifest = json.loads((media_world / "manifest.json").read_text())
    items = [i for _, i in zip(range(6), iter_items(media_world, manifest))]
    text = TextTransformerTower(TextTransformerConfig(dim=32, layers=1, heads=2),
                                train_tokenizer([i["text"] for i in items], 100))
    towers = {"image": ImageTower(ImageTowerConfig(channels=[8, 16], dim=32)),
              "audio": AudioTower(AudioTowerConfig(channels=[8, 16], dim=32)),
              "text": text, "vectors": VectorProjection(5, 32, hidden=16)}
    inputs = {"image": [i["image"] for i in items], "audio": [i["audio"] for i in items],
              "text": [i["text"] for i in items], "vectors": [np.ones(5) * k for k in range(6)]}
    for name, tower in towers.items():
        out = tower(inputs[name])
        assert out.shape == (6, 32) and torch.isfinite(out).all(), name
        out.pow(2).sum().backward()
        frozen = [n for n, p in tower.named_parameters() if p.grad is None]
        assert not frozen, (name, frozen[:3])  # every weight learns


def test_the_pretrained_image_backbone_loads_its_weights_and_fine_tunes_its_last_blocks(
        media_world, tmp_path):
    from foundation.export.programs import export_program
    from foundation.models.efficientnet import weights_path

    manifest = json.loads((media_world / "manifest.json").read_text())
    images = [i["image"] for _, i in zip(range(4), iter_items(media_world, manifest))]
    tower = ImageTower(ImageTowerConfig(size=64, dim=16, backbone="efficientnet_lite0",
                                        trainable_blocks=1))
    stored = torch.load(weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(tower.body._blocks[7]._depthwise_conv.weight,
                       stored["_blocks.7._depthwise_conv.weight"])  # ImageNet weights, not init
    out = tower.train()(images)
    # BatchNorm keeps ImageNet statistics in training: ranks and the export agree
    assert torch.allclose(out, tower.eval()(images), atol=1e-6) and out.shape == (4, 16)
    out.pow(2).sum().backward()
    learning = {n for n, p in tower.named_parameters() if p.grad is not None}
    assert {"head.weight", "body._conv_head.weight",
            "body._blocks.15._project_conv.weight"} <= learning
    assert not any(n.startswith(("body._blocks.14.", "body._conv_stem")) for n in learning)

    class Program(torch.nn.Module):
        input_names = ["pixels"]

        def __init__(self):
            super().__init__()
            self.tower = tower

        def forward(self, pixels):
            return self.tower.encode(pixels)

    batch = torch.export.Dim("batch", min=1, max=1024)
    export_program(Program().eval(), (torch.randn(2, 3, 64, 64),), ({0: batch},),
                   tmp_path / "image", output_name="image_vector")
    pixels = tower.prepare(images[:3])
    served = torch.export.load(str(tmp_path / "image.pt2")).module()(pixels)
    assert torch.allclose(served, tower.encode(pixels), atol=1e-5)
    with pytest.raises(ValueError, match="image.trainable_blocks=17"):
        ImageTower(ImageTowerConfig(backbone="efficientnet_lite0", trainable_blocks=17))


def test_log_mel_puts_a_tone_in_the_band_of_its_pitch():
    cfg = AudioTowerConfig()
    filters = mel_filterbank(cfg.n_fft, cfg.n_mels, cfg.sample_rate)
    bins = np.linspace(0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
    t = torch.arange(4000) / cfg.sample_rate
    for pitch in (300.0, 1000.0, 2500.0):
        spectrogram = log_mel(torch.sin(2 * torch.pi * pitch * t)[None], cfg, filters)
        band = int(spectrogram[0].mean(1).argmax())
        assert abs(bins[int(filters[band].argmax())] - pitch) < 100, pitch


def test_infonce_across_ranks_equals_one_process_over_all_rows(tmp_path):
    run_torchrun(["tests/workers/infonce_ranks.py", str(tmp_path)])
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["loss"] == pytest.approx(report["reference"], abs=1e-5)
        for side in ("a", "b"):  # the other rank's rows are negatives, with their gradient
            assert np.allclose(report[f"grad_{side}"], report[f"reference_grad_{side}"],
                               atol=1e-5)


@pytest.fixture(scope="module")
def encoder_run(media_world, tmp_path_factory) -> Path:
    """Posters and jingles aligned with titles, and posters with a member model's items."""
    member, run = tmp_path_factory.mktemp("behaviour"), tmp_path_factory.mktemp("encoder")
    foundation("train", "recipe=pretrain_member_fm", f"data.path={media_world}",
               f"run_dir={member}", "trainer.max_steps=60", "trainer.eval_every=0", *FAST)
    printed = foundation("train", "--nproc=2", "recipe=pretrain_item_encoder",
                         f"data.path={media_world}", f"run_dir={run}", "data.batch_size=32",
                         "recipe.pairs=[image:text,audio:text,image:behaviour]",
                         f"recipe.behaviour_from={member}",
                         "trainer.max_steps=40", "trainer.eval_every=20", *FAST)
    assert "(chance " in printed
    return run


@pytest.mark.slow
def test_the_encoder_recipe_aligns_held_out_pairs_on_two_ranks(encoder_run):
    run = encoder_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    final = [r for r in rows if "recall@1" in r][-1]
    for pair, times_chance in (("image:text", 5), ("audio:text", 5), ("image:behaviour", 3)):
        items = final[f"{pair}/items"]
        assert items >= 20  # held-out items, never trained on
        assert final[f"{pair}/recall@1"] >= times_chance / items, pair  # chance: 1 / items
    assert 0.01 <= final["temperature"] <= 0.2
    assert (run / "text_tokenizer.json").exists()
    foundation("eval", f"run_dir={run}", "split=val")
    evaluated = json.loads((run / "eval.json").read_text())
    # The same items and weights; one rank's batches differ, which can flip a near-tie.
    assert evaluated["metrics"]["recall@1"] == pytest.approx(final["recall@1"], abs=0.02)


@pytest.mark.slow
def test_a_member_model_reads_the_encoders_image_tower_and_serves_new_posters(
        media_world, encoder_run, tmp_path):
    """Posters through the trained image tower, into the member model; the bundle embeds a
    new poster from its file as the model does (the export's parity gate checks the tower)
    and can recommend it at once."""
    from foundation.export import History, load_bundle

    run, bundle = tmp_path / "member", tmp_path / "bundle"
    foundation("train", "recipe=pretrain_member_fm", f"data.path={media_world}",
               f"run_dir={run}", "model.item_content=[image]", f"model.item_encoder={encoder_run}",
               "model.item_table=replicated", "recipe.loss=full_softmax", "model.id_dropout=0.3",
               "trainer.max_steps=60", "trainer.eval_every=0", *FAST)
    assert (run / "content" / "image.safetensors").exists()  # encoded once, cached
    foundation("export", f"run_dir={run}", f"output={bundle}", "ann=false",
               "precisions=[fp32]", "parity_batches=1")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["parity"]["towers"]["max_abs_diff"]["onnx"] <= 1e-4
    assert {"towers/image.pt2", "towers/image.onnx"} <= set(manifest["files"])
    parts = {f["name"]: f for f in manifest["item_features"]}
    assert list(parts) == ["item", "image"] and str(encoder_run) in parts["image"]["lives"]
    assert parts["item"]["lives"].startswith("replicated")
    predictor = load_bundle(bundle)
    poster = media_world / "raw/media/5.png"
    predictor.add_items({100_001: {"image": poster}, 100_002: {"image": poster.read_bytes()}})
    history = History(items=[1, 2, 3])
    scores = predictor.score(history, [100_001, 100_002])
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)  # a path and its bytes agree
    everything = predictor.recommend(history, k=len(predictor.catalogue))
    assert 100_001 in everything and 100_002 in everything


@pytest.mark.slow
def test_an_interrupted_encoder_run_resumes_to_the_same_weights(media_world, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    args = ["train", "recipe=pretrain_item_encoder", f"data.path={media_world}",
            f"run_dir={run}", "data.batch_size=32", "trainer.max_steps=12",
            "trainer.checkpoint_every=6", "trainer.eval_every=0", *FAST]
    foundation(*args)
    final = run / "checkpoints/step-12"
    uninterrupted = load_file(str(final / "dense.safetensors"))
    tokenizer = (run / "text_tokenizer.json").read_text()
    shutil.rmtree(final)  # as if the job died after step 6's checkpoint
    assert "resumed from" in foundation(*args)
    resumed = load_file(str(final / "dense.safetensors"))
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert (run / "text_tokenizer.json").read_text() == tokenizer
    again = train_tokenizer(["Haunted ghost story", "Space galaxy", "ghost"], 50)
    assert again == train_tokenizer(["Haunted ghost story", "Space galaxy", "ghost"], 50)
