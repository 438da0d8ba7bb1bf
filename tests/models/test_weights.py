"""Pretrained weights: named, cached and file weights load through the real code, offline.

Every weights file here is generated in the exact layout and under the exact file name the
loading API expects (torchvision's and TorchGeo's weights URLs), in a temporary torch hub
cache (``TORCH_HOME``): the code under test finds it there as an air-gapped user's copy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from deforest.cli.train import train
from deforest.mapping.predict import load_classifier
from deforest.models.weights import WeightsError
from deforest.runs.build import build_datamodule, build_model
from deforest.training.module import TileClassifier

EUROSAT_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]
SSL4EO_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8a", "B9", "B10", "B11", "B12"]
#: for each EuroSAT band, its position among SSL4EO's
SSL4EO_INDEX = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 8]
FIT = ["+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
       "report.enabled=false"]


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache (``$TORCH_HOME/hub/checkpoints``), as on an offline machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


def _cache_name(weights) -> str:
    return weights.url.rsplit("/", 1)[-1]


def _timm_resnet(name: str, in_chans: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in TorchGeo's layout: a timm ResNet without its classifier."""
    torch.manual_seed(seed)
    state = timm.create_model(name, in_chans=in_chans, num_classes=0).state_dict()
    # random batch-norm statistics, so a wrongly mapped layer shows in the logits
    for key, value in state.items():
        if key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
        elif key.endswith("running_mean"):
            value.normal_(0, 0.1)
    return state


def _datamodule(cfg):
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    return datamodule


def test_imagenet_weights_load_from_the_hub_cache(hub, train_config):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18().state_dict()
    torch.save(imagenet, hub / _cache_name(torchvision.models.ResNet18_Weights.IMAGENET1K_V1))
    cfg = train_config(["model=resnet18", "model.weights=imagenet"])
    model = build_model(cfg.model, cfg.loss, _datamodule(cfg))
    net = model.net
    torch.testing.assert_close(net.layer3[1].conv2.weight, imagenet["layer3.1.conv2.weight"])
    torch.testing.assert_close(net.bn1.running_var, imagenet["bn1.running_var"])
    # ImageNet's red, green, blue kernels go to B04, B03, B02 as they are; the other ten bands
    # get their mean scaled by 3/13 (timm's adapt_input_conv, applied to the new bands only)
    rgb, scale = imagenet["conv1.weight"], 3 / 13
    torch.testing.assert_close(net.conv1.weight[:, EUROSAT_BANDS.index("B04")], rgb[:, 0])
    torch.testing.assert_close(net.conv1.weight[:, EUROSAT_BANDS.index("B02")], rgb[:, 2])
    torch.testing.assert_close(net.conv1.weight[:, EUROSAT_BANDS.index("B11")], rgb.mean(dim=1) * scale)
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2)  # the pretrained stem is kept
    plan = model.hparams.network["pretrained"]
    assert plan["weights"].startswith("imagenet") and plan["dropped_bands"] == []
    assert plan["new_bands"] == [b for b in EUROSAT_BANDS if b not in ("B02", "B03", "B04")]
    assert model.spec.normalization.source == "training" and model.spec.normalization.transform == "log1p"


def test_torchgeo_weight_name_loads_with_its_bands_and_scaling(hub, train_config):
    from torchgeo.models import ResNet18_Weights

    ssl4eo = _timm_resnet("resnet18", 13)
    torch.save(ssl4eo, hub / _cache_name(ResNet18_Weights.SENTINEL2_ALL_MOCO))
    cfg = train_config(["model=resnet18", "model.weights=ResNet18_Weights.SENTINEL2_ALL_MOCO"])
    model = build_model(cfg.model, cfg.loss, _datamodule(cfg))
    # same 13 bands in another order: every kernel is the weights' own, unscaled
    torch.testing.assert_close(model.net.conv1.weight, ssl4eo["conv1.weight"][:, SSL4EO_INDEX])
    torch.testing.assert_close(model.net.layer4[0].downsample[0].weight, ssl4eo["layer4.0.downsample.0.weight"])
    # SSL4EO-S12 inputs are reflectance / 10,000, not this data's log1p statistics
    norm = model.spec.normalization
    assert norm.source == "ResNet18_Weights.SENTINEL2_ALL_MOCO" and norm.transform == "scale"
    assert norm.mean == [0.0] * 13 and norm.std == [10000.0] * 13
    x = torch.full((1, 13, 4, 4), 2500.0)
    torch.testing.assert_close(model.normalizer(x), torch.full_like(x, 0.25))


def test_torchgeo_vit_weights_load_into_a_timm_backbone(hub, train_config):
    """No torchvision equivalent: the timm ViT of the weights, its positions resampled to 64 px tiles."""
    from torchgeo.models import ViTSmall16_Weights

    torch.manual_seed(0)
    dino = timm.create_model("vit_small_patch16_224", in_chans=13, num_classes=0).state_dict()
    torch.save(dino, hub / _cache_name(ViTSmall16_Weights.SENTINEL2_ALL_DINO))
    cfg = train_config(["model=vit_small", "model.weights=ViTSmall16_Weights.SENTINEL2_ALL_DINO"])
    model = build_model(cfg.model, cfg.loss, _datamodule(cfg)).eval()
    net = model.net
    torch.testing.assert_close(net.patch_embed.proj.weight, dino["patch_embed.proj.weight"][:, SSL4EO_INDEX])
    torch.testing.assert_close(net.blocks[11].mlp.fc2.weight, dino["blocks.11.mlp.fc2.weight"])
    assert dino["pos_embed"].shape[1] == 1 + 14 * 14 and net.pos_embed.shape[1] == 1 + 4 * 4
    torch.testing.assert_close(net.pos_embed[:, 0], dino["pos_embed"][:, 0])  # the class token's own
    assert model.spec.normalization.std == [10000.0] * 13
    with torch.no_grad():
        assert model(torch.rand(2, 13, 64, 64) * 3000).shape == (2, 10)


def test_a_weight_for_another_network_is_one_clear_error(hub, train_config):
    cfg = train_config(["model=resnet18", "model.weights=ResNet50_Weights.SENTINEL2_ALL_MOCO"])
    with pytest.raises(WeightsError, match=r"is for a 'resnet50' network: use model=resnet50"):
        build_model(cfg.model, cfg.loss, _datamodule(cfg))
    cfg = train_config(["model=resnet18", f"model.weights={hub / 'nothing.pth'}"])
    with pytest.raises(WeightsError, match=r"nothing.pth: no such file, and not 'imagenet' or a TorchGeo weight"):
        build_model(cfg.model, cfg.loss, _datamodule(cfg))
    torch.save(_timm_resnet("resnet50", 13), hub / "r50.pth")
    cfg = train_config(["model=resnet18", f"model.weights={hub / 'r50.pth'}", f"model.weights_bands=[{','.join(SSL4EO_BANDS)}]"])
    with pytest.raises(WeightsError, match=r"r50.pth does not fit resnet18: .*size mismatch"):
        build_model(cfg.model, cfg.loss, _datamodule(cfg))


def test_local_file_with_weights_bands_maps_kernels_by_name(tmp_path, train_config):
    """A 4-band .safetensors file: its bands go to the data's by name, the rest get their mean."""
    state = _timm_resnet("resnet18", 4)
    save_file(state, str(tmp_path / "nir_rgb.safetensors"))
    cfg = train_config([
        "model=resnet18", f"model.weights={tmp_path / 'nir_rgb.safetensors'}",
        "model.weights_bands=[B8,B4,B3,B2]", "model.weights_normalization={mean: 0, std: 3000}",
    ])
    model = build_model(cfg.model, cfg.loss, _datamodule(cfg))
    kernels, scale = state["conv1.weight"], 4 / 13
    for band, j in (("B08", 0), ("B04", 1), ("B03", 2), ("B02", 3)):
        torch.testing.assert_close(model.net.conv1.weight[:, EUROSAT_BANDS.index(band)], kernels[:, j])
    torch.testing.assert_close(model.net.conv1.weight[:, EUROSAT_BANDS.index("B8A")], kernels.mean(dim=1) * scale)
    assert model.hparams.network["pretrained"]["weights_bands"] == ["B8", "B4", "B3", "B2"]
    assert len(model.hparams.network["pretrained"]["new_bands"]) == 9
    assert model.spec.normalization.std == [3000.0] * 13 and model.spec.normalization.transform == "scale"


def test_a_band_subset_keeps_the_pretrained_kernels_unscaled(tmp_path, train_config):
    """4 of a 13-band file's bands: the kernels are the ones trained on those bands, as they are.

    Scaling them by 13/4 (as timm does for new channels) would triple the stem's response to the
    very bands the weights know; only kernels made up for bands the weights lack are scaled.
    """
    state = _timm_resnet("resnet18", 13)
    torch.save(state, tmp_path / "s2.pth")
    cfg = train_config([
        "model=resnet18", f"model.weights={tmp_path / 's2.pth'}", f"model.weights_bands=[{','.join(SSL4EO_BANDS)}]",
        "data.bands=[B04,B03,B02,B08]",
    ])
    model = build_model(cfg.model, cfg.loss, _datamodule(cfg))
    kernels = state["conv1.weight"]
    assert model.net.conv1.weight.shape[1] == 4 and model.hparams.network["pretrained"]["new_bands"] == []
    for j, band in enumerate(("B4", "B3", "B2", "B8")):
        torch.testing.assert_close(model.net.conv1.weight[:, j], kernels[:, SSL4EO_BANDS.index(band)])


def test_a_file_without_band_names_is_matched_in_order_when_the_counts_agree(tmp_path, train_config, caplog):
    state = _timm_resnet("resnet18", 13)
    torch.save(state, tmp_path / "s2.pth")
    cfg = train_config(["model=resnet18", f"model.weights={tmp_path / 's2.pth'}"])
    with caplog.at_level(logging.WARNING, logger="deforest.models.weights"):
        model = build_model(cfg.model, cfg.loss, _datamodule(cfg))
    assert "the 13 bands are matched in order" in caplog.text
    torch.testing.assert_close(model.net.conv1.weight, state["conv1.weight"])
    cfg = train_config(["model=resnet18", f"model.weights={tmp_path / 's2.pth'}", "data.bands=[B04,B03,B02]"])
    with pytest.raises(WeightsError, match=r"takes 13 bands and the network 3: give model.weights_bands"):
        build_model(cfg.model, cfg.loss, _datamodule(cfg))


def test_permuted_band_order_gives_the_same_logits(tmp_path, train_config):
    """The same weights on the same tiles read in another band order: the same logits."""
    torch.save(_timm_resnet("resnet18", 13), tmp_path / "s2.pth")
    permuted = EUROSAT_BANDS[::-1][:6] + EUROSAT_BANDS[::-1][6:][::-1]  # B8A, B12, ... then B01..B07
    logits = []
    for bands in (EUROSAT_BANDS, permuted):
        cfg = train_config([
            "model=resnet18", f"model.weights={tmp_path / 's2.pth'}", f"model.weights_bands=[{','.join(SSL4EO_BANDS)}]",
            f"data.bands=[{','.join(bands)}]", "data.augment=[]",
        ])
        datamodule = _datamodule(cfg)
        torch.manual_seed(0)  # the same new classifier head
        model = build_model(cfg.model, cfg.loss, datamodule).eval()
        tiles = torch.stack([datamodule.datasets["test"][i]["image"] for i in range(6)])
        with torch.no_grad():
            logits.append(model(tiles))
        assert model.hparams.network["pretrained"]["network_bands"] == bands
    assert permuted != EUROSAT_BANDS and logits[0].abs().sum() > 0
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_preprocessing_and_band_mapping_travel_with_the_checkpoint(hub, train_config, caplog):
    """Trained from SSL4EO weights, the checkpoint alone gives eval and predict the /10,000 scaling."""
    from torchgeo.models import ResNet18_Weights

    cached = hub / _cache_name(ResNet18_Weights.SENTINEL2_ALL_MOCO)
    torch.save(_timm_resnet("resnet18", 13), cached)
    cfg = train_config(["model=resnet18", "model.weights=ResNet18_Weights.SENTINEL2_ALL_MOCO", *FIT])
    with caplog.at_level(logging.INFO, logger="deforest.models.weights"):
        metrics = train(cfg)
    assert "first-layer kernels by band" in caplog.text and "'B8A': 'B8a'" in caplog.text
    cached.unlink()  # loading the checkpoint must not need the weights again
    for model in (TileClassifier.load_from_checkpoint(metrics["best_checkpoint"]), load_classifier(metrics["best_checkpoint"])[0]):
        assert model.spec.normalization.source == "ResNet18_Weights.SENTINEL2_ALL_MOCO"
        assert model.hparams.network["pretrained"]["weights_bands"] == SSL4EO_BANDS
        assert model.spec.band_names == EUROSAT_BANDS
        x = torch.rand(2, 13, 64, 64) * 5000
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), model.net(x / 10000))
    # the deforest checkpoint is itself a weights file: its bands and scaling come with it
    again = train_config(["model=resnet18", f"model.weights={metrics['best_checkpoint']}", "data.bands=[B04,B03,B02,B08]"])
    model = build_model(again.model, again.loss, _datamodule(again))
    assert model.hparams.network["pretrained"]["network_bands"] == ["B04", "B03", "B02", "B08"]
    assert model.spec.normalization.std == [10000.0] * 4 and model.spec.normalization.transform == "scale"


def test_small_tile_stem_drops_the_pretrained_stem_and_says_so(tmp_path, train_config, caplog):
    state = _timm_resnet("resnet18", 13)
    torch.save(state, tmp_path / "s2.pth")
    cfg = train_config(["model=resnet18", f"model.weights={tmp_path / 's2.pth'}", "model.small_tile_stem=true",
                        f"model.weights_bands=[{','.join(SSL4EO_BANDS)}]"])
    with caplog.at_level(logging.WARNING, logger="deforest.models.weights"):
        model = build_model(cfg.model, cfg.loss, _datamodule(cfg))
    assert "the pretrained stem conv1.weight (64, 13, 7, 7) is dropped" in caplog.text
    assert model.net.conv1.kernel_size == (3, 3)
    torch.testing.assert_close(model.net.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_input_resize_feeds_the_network_the_published_size(train_config):
    cfg = train_config(["model=resnet18", "model.input_resize=96"])
    model = build_model(cfg.model, cfg.loss, _datamodule(cfg)).eval()
    seen = []
    model.net.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        model(torch.rand(2, 13, 64, 64))
    assert seen == [(2, 13, 96, 96)]


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def test_backbone_finetuning_freezes_then_unfreezes_at_the_scaled_rate(tmp_path, train_config):
    import lightning.pytorch as pl

    from deforest.runs.build import build_trainer

    torch.save(_timm_resnet("resnet18", 13), tmp_path / "s2.pth")
    cfg = train_config(["model=resnet18", f"model.weights={tmp_path / 's2.pth'}", f"model.weights_bands=[{','.join(SSL4EO_BANDS)}]",
                        "model.unfreeze_backbone_at_epoch=1", "model.backbone_lr_multiplier=0.1",
                        "trainer.max_epochs=2", "callbacks=none", *FIT])
    datamodule = _datamodule(cfg)
    model = build_model(cfg.model, cfg.loss, datamodule)
    snapshots: list[dict[str, torch.Tensor]] = [_snapshot(model.net)]

    class Snapshot(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots.append(_snapshot(pl_module.net))

    trainer = build_trainer(cfg)
    trainer.callbacks.append(Snapshot())
    trainer.fit(model, datamodule=datamodule)
    start, epoch0, epoch1 = snapshots
    convolutions = [k for k in start if k.endswith("weight") and start[k].ndim == 4]
    changed0 = {k for k in start if not torch.equal(start[k], epoch0[k])}
    changed1 = {k for k in start if not torch.equal(epoch0[k], epoch1[k])}
    assert {"fc.1.weight", "bn1.weight", "bn1.running_mean"} <= changed0  # head and batch norm train
    assert not changed0 & set(convolutions)  # frozen backbone in epoch 0
    assert set(convolutions) <= changed1  # unfrozen from epoch 1
    head, backbone = trainer.optimizers[0].param_groups
    assert backbone["max_lr"] == pytest.approx(0.1 * head["max_lr"])  # OneCycleLR peaks per group


def test_linear_probe_trains_only_the_head(tmp_path, train_config):
    torch.save(_timm_resnet("resnet18", 13), tmp_path / "s2.pth")
    cfg = train_config(["model=resnet18", f"model.weights={tmp_path / 's2.pth'}", f"model.weights_bands=[{','.join(SSL4EO_BANDS)}]",
                        "model.freeze_backbone=true", "callbacks=none", *FIT])
    datamodule = _datamodule(cfg)
    model = build_model(cfg.model, cfg.loss, datamodule)
    before = _snapshot(model.net)
    from deforest.runs.build import build_trainer

    build_trainer(cfg).fit(model, datamodule=datamodule)
    assert _changed(before, model.net) == {"fc.1.weight", "fc.1.bias"}  # batch-norm statistics included


def test_each_model_config_stands_on_its_own(train_config):
    small = train_config(["model=small_cnn"]).model
    assert (small.input_pool, small.band_statistics, list(small.network_exclude_bands)) == (2, True, ["B01", "B09", "B10"])
    for name in ("resnet18", "resnet50", "efficientnet_b0"):
        model = train_config([f"model={name}"]).model
        assert model.backbone == name and model.small_tile_stem is False
        assert not {"input_pool", "band_statistics", "network_exclude_bands"} & set(model)
        assert model.weights is None and model.optimizer.lr == small.optimizer.lr  # shared base


def test_the_optuna_search_picks_whole_model_configs():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        search = compose("train", overrides=["hparams_search=optuna"], return_hydra_config=True)
        choices = search.hydra.sweeper.params["model"]
        assert choices == "choice(small_cnn, resnet18)" and "model.backbone" not in search.hydra.sweeper.params
        assert "band_statistics" not in compose("train", overrides=["hparams_search=optuna", "model=resnet18"]).model


def _write(path: Path, names: list[str]) -> str:
    path.write_text("".join(f"{n}\n" for n in names))
    return str(path)


def test_eurosat_split_files_set_the_splits_on_the_real_sample(tmp_path, train_config, eurosat_root):
    """TorchGeo-style lists (``.jpg`` names) over the real sample: listed tiles get their split, the rest go."""
    train_tiles = sorted(p.stem for p in (eurosat_root / "train").rglob("*.tif"))
    test_tiles = sorted(p.stem for p in (eurosat_root / "test").rglob("*.tif"))
    val = [t for i, t in enumerate(train_tiles) if i % 5 == 0]
    train_list = [t for i, t in enumerate(train_tiles) if i % 5 and i % 7]
    left_out = [t for i, t in enumerate(train_tiles) if i % 5 and not i % 7]
    files = {"train": _write(tmp_path / "eurosat-train.txt", [f"{t}.jpg" for t in train_list]),
             "val": _write(tmp_path / "eurosat-val.txt", [f"{t}.jpg" for t in val]),
             "test": _write(tmp_path / "eurosat-test.txt", [f"{t}.jpg" for t in test_tiles] + ["Forest_99999.jpg"])}
    cfg = train_config([f"data.split_files={{train: {files['train']}, val: {files['val']}, test: {files['test']}}}"])
    datamodule = _datamodule(cfg)
    got = {s: sorted(Path(p).stem for p in d.sources) for s, d in datamodule.datasets.items()}
    assert got == {"train": sorted(train_list), "val": sorted(val), "test": test_tiles}
    assert left_out and not set(left_out) & set(sum(got.values(), []))
    both = _write(tmp_path / "overlap.txt", val[:2])
    cfg = train_config([f"data.split_files={{train: {files['train']}, val: {files['val']}, test: {both}}}"])
    with pytest.raises(Exception, match=r"overlap.txt: .* is also listed in .*eurosat-val.txt"):
        _datamodule(cfg)


def test_bigearthnet_official_lists_on_the_real_patches(tmp_path, train_config, bigearthnet_root):
    patches = sorted(p.name for p in bigearthnet_root.iterdir() if p.is_dir())
    constant = "S2B_MSIL2A_20170906T101019_76_61"  # the shipped constant-valued patch
    cloudy, snowy = [constant, patches[3]], [patches[10]]
    rest = [p for p in patches if p not in cloudy + snowy]
    split_of = {p: {1: "val", 2: "test"}.get(i % 6, "train") for i, p in enumerate(patches)}
    for split in ("train", "val", "test"):  # BigEarthNet-MM's CSV lines: S2 patch, S1 patch
        _write(tmp_path / f"{split}.csv", [f"{p},S1_{p}" for p in patches if split_of[p] == split])
    _write(tmp_path / "patches_with_cloud_and_shadow.csv", cloudy)
    _write(tmp_path / "patches_with_seasonal_snow.csv", snowy)
    cfg = train_config(["experiment=bigearthnet19_benchmark", f"data.root={bigearthnet_root}",
                        f"data.layout.split_csvs={{train: {tmp_path}/train.csv, val: {tmp_path}/val.csv, test: {tmp_path}/test.csv}}",
                        f"data.layout.exclude_csvs=[{tmp_path}/patches_with_cloud_and_shadow.csv,{tmp_path}/patches_with_seasonal_snow.csv]"])
    datamodule = _datamodule(cfg)
    got = {s: sorted(Path(p).name for p in d.sources) for s, d in datamodule.datasets.items()}
    assert got == {s: sorted(p for p in rest if split_of[p] == s) for s in ("train", "val", "test")}
    assert constant not in sum(got.values(), []) and len(sum(got.values(), [])) == 41
    assert set(datamodule.class_names) <= set(_torchgeo_bigearthnet().class_sets[19])


def _torchgeo_bigearthnet():
    from torchgeo.datasets import BigEarthNet

    return BigEarthNet


def test_bigearthnet_nomenclatures_are_the_official_ones():
    from deforest.data.bigearthnet import BIGEARTHNET_19, BIGEARTHNET_43, BIGEARTHNET_43_TO_19

    official = _torchgeo_bigearthnet()
    assert BIGEARTHNET_43 == official.class_sets[43] and len(BIGEARTHNET_43) == 43
    assert BIGEARTHNET_19 == official.class_sets[19]
    mapped = {official.class_sets[43][i]: official.class_sets[19][j] for i, j in official.label_converter.items()}
    assert BIGEARTHNET_43_TO_19 == mapped


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["eurosat_benchmark", "bigearthnet19_benchmark"])
def test_benchmark_experiments_run_on_generated_lists_and_cached_weights(experiment, hub, tmp_path, train_config,
                                                                          eurosat_root, bigearthnet_root, monkeypatch):
    from torchgeo.models import ResNet50_Weights

    torch.save(_timm_resnet("resnet50", 13), hub / _cache_name(ResNet50_Weights.SENTINEL2_ALL_MOCO))
    lists = tmp_path / "lists"
    lists.mkdir()
    if experiment == "eurosat_benchmark":
        names = sorted(p.stem for p in eurosat_root.rglob("*.tif"))  # by class: every class in every split
        for k, split in enumerate(("train", "val", "test")):
            _write(lists / f"eurosat-{split}.txt", [f"{n}.jpg" for i, n in enumerate(names) if min(i % 5, 2) == (2, 0, 1)[k]])
        monkeypatch.setenv("EUROSAT_SPLITS", str(lists))
    else:
        names = sorted(p.name for p in bigearthnet_root.iterdir() if p.is_dir())
        for k, split in enumerate(("train", "val", "test")):
            _write(lists / f"{split}.csv", [n for i, n in enumerate(names) if min(i % 5, 2) == (2, 0, 1)[k]])
        _write(lists / "patches_with_cloud_and_shadow.csv", ["S2B_MSIL2A_20170906T101019_76_61"])
        _write(lists / "patches_with_seasonal_snow.csv", [])
        monkeypatch.setenv("BIGEARTHNET_SPLITS", str(lists))
    cfg = train_config([f"experiment={experiment}", "trainer.fast_dev_run=true", "data.batch_size=4", "report.enabled=false"])
    metrics = train(cfg)
    key = "test/map" if experiment.startswith("bigearthnet") else "test/accuracy"
    assert 0.0 <= metrics[key] <= 1.0
