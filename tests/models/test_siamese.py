"""The siamese option for two-date samples (``model.fusion=siamese``): one backbone shared by
both dates, the pooled features of each date and their difference into the classifier.

Pairs are the real Rondonia Landsat 8 clip and a copy with seeded clearings, built as in
``test_change.py`` (its builders); they check the mechanics, not how well clearings are found.
"""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import rasterio
import torch
from hydra import compose, initialize_config_module

from deforest.cli.export import export
from deforest.cli.predict import predict
from deforest.cli.train import train
from deforest.core.contract import InputSpec, Normalization, SourceRecord
from deforest.core.errors import ConfigError
from deforest.data.pairs import dated_band_names
from deforest.models.networks import SiameseNetwork
from deforest.training.module import TileClassifier
from tests.conftest import REPO
from tests.mapping.test_change import BANDS, _write, simulate_clearing, write_pairs

DATED = dated_band_names(BANDS)  # B2@t0 ... B7@t0, B2@t1 ... B7@t1


def _spec(names: list[str], **changes) -> InputSpec:
    n = len(names)
    return InputSpec(task="multiclass", class_names=["loss", "stable"], bands=list(range(1, n + 1)),
                     source=SourceRecord(n, "int16"), nodata=None, normalization=Normalization([6.0] * n, [1.0] * n),
                     tile_size=[32, 32], band_names=names, **changes)


def _raw(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(50, 3000, (4, n, 32, 32)).astype(np.float32))


def test_siamese_forward_shapes_and_one_shared_backbone():
    torch.manual_seed(0)
    siamese = TileClassifier(_spec(DATED), network={"width": 8, "fusion": "siamese"}).eval()
    early = TileClassifier(_spec(DATED), network={"width": 8}).eval()
    net = siamese.net
    assert isinstance(net, SiameseNetwork) and net.date_bands.tolist() == [list(range(6)), list(range(6, 12))]
    x = _raw(12)
    assert siamese(x).shape == (4, 2)
    # one backbone for both dates: its first convolution takes one date's 6 bands, not 12
    first = next(m for m in net.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 6
    features = net.features
    assert features == 64  # small_cnn of width 8: 8 * 8 channels pooled
    assert net.classifier.in_features == 3 * features and net.classifier.out_features == 2
    encoder_params = sum(p.numel() for p in net.encoder.parameters())
    early_encoder = sum(p.numel() for name, p in early.net.named_parameters() if not name.startswith("head."))
    # the early-fusion stem sees 12 bands: 6 bands x 8 kernels x 3 x 3 more weights than the shared one
    assert early_encoder - encoder_params == 6 * 8 * 9
    assert sum(p.numel() for p in net.parameters()) == encoder_params + 3 * features * 2 + 2

    # the logits are the classifier on [f0, f1, |f0 - f1|] of the shared encoder run on each date
    with torch.no_grad():
        z = siamese.normalizer(x)
        f0, f1 = net.encoder(z[:, :6]), net.encoder(z[:, 6:])
        expected = net.classifier(torch.cat([f0, f1, (f0 - f1).abs()], dim=1))
        torch.testing.assert_close(siamese(x), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(f0, f1)


def test_siamese_gradients_reach_the_shared_backbone_from_both_dates():
    torch.manual_seed(0)
    model = TileClassifier(_spec(DATED), network={"width": 8, "fusion": "siamese"}).eval()  # batch norm at fixed statistics
    net = model.net
    first = next(m for m in net.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    x = _raw(12).requires_grad_(True)
    model(x).logsumexp(dim=1).sum().backward()
    assert (x.grad.abs().sum(dim=(0, 2, 3)) > 0).all()  # every band of both dates feeds the output
    full = first.weight.grad.clone()

    def share(date: int) -> torch.Tensor:
        """The shared kernel's gradient through one date's pass, the other date's features held fixed."""
        model.zero_grad()
        z = model.normalizer(x.detach())
        f = [net.encoder(z[:, :6]) if date == 0 else None, net.encoder(z[:, 6:]) if date == 1 else None]
        with torch.no_grad():
            f[1 - date] = net.encoder(z[:, 6:] if date == 0 else z[:, :6])
        net.classifier(torch.cat([f[0], f[1], (f[0] - f[1]).abs()], 1)).logsumexp(dim=1).sum().backward()
        return first.weight.grad.clone()

    share0, share1 = share(0), share(1)
    assert share0.abs().sum() > 0 and share1.abs().sum() > 0
    # one kernel, two uses: its gradient is the sum of what each date's pass gives it
    torch.testing.assert_close(share0 + share1, full, rtol=1e-4, atol=1e-6)


def test_siamese_splits_dates_by_name_in_order():
    """Bands listed date by date or interleaved (``data.bands=[B2@t0,B2@t1,...]``): the network
    takes each date's bands by their names, so both orders give the same logits."""
    torch.manual_seed(0)
    model = TileClassifier(_spec(DATED), network={"width": 8, "fusion": "siamese"}).eval()
    order = [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]  # B2@t0, B2@t1, B3@t0, B3@t1, ...
    interleaved = TileClassifier(_spec([DATED[i] for i in order]), network={"width": 8, "fusion": "siamese"}).eval()
    interleaved.load_state_dict(model.state_dict())
    assert interleaved.net.date_bands.tolist() == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]
    x = _raw(12)
    with torch.no_grad():
        torch.testing.assert_close(interleaved(x[:, order]), model(x))
    with pytest.raises(ValueError, match=r"model.fusion=siamese needs the same bands of each date in the same order: "
                                         r"t0 has \[B2, B3, B4, B5, B6, B7\], t1 \[B2, B3\]"):
        TileClassifier(_spec(DATED[:6] + DATED[6:8]), network={"width": 8, "fusion": "siamese"})
    swapped = DATED[:6] + [DATED[7], DATED[6], *DATED[8:]]
    with pytest.raises(ValueError, match=r"t1 \[B3, B2, B4, B5, B6, B7\]"):
        TileClassifier(_spec(swapped), network={"width": 8, "fusion": "siamese"})


def test_siamese_needs_dated_bands_in_one_line(train_config, eurosat_root):
    cfg = train_config([f"data.root={eurosat_root}", "model.fusion=siamese"])
    with pytest.raises(ConfigError, match=r"^model.fusion=siamese needs two-date samples \(data=pairs\): the bands "
                                          r"\[B02, B03, B04, B05, \.\.\.\] carry no date \(a pair's bands are named B04@t0, B04@t1\)$"):
        train(cfg)
    with pytest.raises(ConfigError, match=r"model.fusion='stacked' must be one of \['early', 'siamese'\]"):
        train(train_config([f"data.root={eurosat_root}", "model.fusion=stacked"]))


def _train(train_config, root, extra: list[str]) -> dict:
    cfg = train_config(["experiment=forest_loss", f"data.root={root}", f"data.layout.band_names=[{','.join(BANDS)}]",
                        "model.input_pool=1", "trainer.max_epochs=1", "data.batch_size=32", "model.fusion=siamese",
                        *extra])
    return train(cfg)


@pytest.fixture(scope="module")
def siamese_run(tmp_path_factory) -> dict:
    """A multi-class siamese model trained one epoch on the pairs, through the real command."""
    from tests.conftest import compose_train_config

    tmp = tmp_path_factory.mktemp("siamese")
    root = tmp / "pairs"
    write_pairs(root)
    metrics = _train(lambda o: compose_train_config(tmp / "run", o), root, [])
    return {"root": root, "metrics": metrics, "ckpt": metrics["best_checkpoint"], "tmp": tmp}


def test_siamese_trains_multiclass_and_the_checkpoint_keeps_it(siamese_run, tmp_path):
    metrics = siamese_run["metrics"]
    assert 0.0 <= metrics["test/accuracy"] <= 1.0
    model = TileClassifier.load_from_checkpoint(siamese_run["ckpt"], map_location="cpu")
    assert model.hparams.network["fusion"] == "siamese" and isinstance(model.net, SiameseNetwork)
    assert model.band_statistics is not None  # the statistics head sees both dates' bands beside it
    assert model.input_spec.band_names == DATED
    from deforest.cli.eval import evaluate

    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        cfg = compose("eval", overrides=[
            f"paths.root_dir={REPO}", f"paths.output_dir={tmp_path / 'eval'}", f"paths.cache_dir={tmp_path / 'cache'}",
            f"ckpt_path={siamese_run['ckpt']}", "trainer.enable_progress_bar=false", "report.enabled=false",
            "data=pairs", f"data.root={siamese_run['root']}"])
    assert evaluate(cfg)["test/accuracy"] == pytest.approx(metrics["test/accuracy"])


def test_siamese_trains_multilabel(train_config, tmp_path):
    root = tmp_path / "multilabel"
    write_pairs(root, multilabel=True)
    metrics = _train(train_config, root, ["model.band_statistics=false"])
    model = TileClassifier.load_from_checkpoint(metrics["best_checkpoint"], map_location="cpu")
    assert model.task == "multilabel" and isinstance(model.net, SiameseNetwork) and model.band_statistics is None
    for key in ("test/f1_micro", "test/f1_macro", "test/map"):
        assert 0.0 <= metrics[key] <= 1.0


def test_siamese_change_map_from_the_reloaded_checkpoint(siamese_run, tmp_path):
    """deforest-predict on the two whole scenes: each map pixel holds what the checkpoint's
    model, loaded afresh, gives for the two dates' window under it."""
    before, after, _, profile = simulate_clearing()
    _write(tmp_path / "before.tif", before, profile, BANDS)
    _write(tmp_path / "after.tif", after, profile, BANDS)
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        summary = predict(compose("predict", overrides=[
            f"ckpt_path={siamese_run['ckpt']}", f"before={tmp_path / 'before.tif'}", f"after={tmp_path / 'after.tif'}",
            f"out={tmp_path / 'map.tif'}", "stride=32", "dtype=float32", "device=cpu", "change.min_area_ha=0"]))
    assert summary["band_order"].startswith("matched by name") and (tmp_path / "map_change.tif").is_file()
    model = TileClassifier.load_from_checkpoint(siamese_run["ckpt"], map_location="cpu").eval()
    stacked = np.concatenate([before, after]).astype(np.float32)
    with rasterio.open(tmp_path / "map.tif") as src:
        probs = src.read()[1:]  # band 1: class; then p_loss, p_stable
    rows, cols = stacked.shape[1] // 32, stacked.shape[2] // 32
    windows = np.stack([stacked[:, r * 32 : r * 32 + 32, c * 32 : c * 32 + 32] for r in range(rows) for c in range(cols)])
    assert (windows != -9999).all()  # no nodata in the clip's windows: nothing filled
    with torch.no_grad():
        expected = model.predict_proba(torch.from_numpy(windows)).numpy()
    got = probs[:, :rows, :cols].reshape(2, -1).T
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert expected[:, 0].max() - expected[:, 0].min() > 0.01  # the map is not one constant


def test_siamese_onnx_export_matches(siamese_run, tmp_path):
    out = tmp_path / "model.onnx"
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        export(compose("export", overrides=[f"ckpt_path={siamese_run['ckpt']}", "format=onnx", f"out={out}"]))
    model = TileClassifier.load_from_checkpoint(siamese_run["ckpt"], map_location="cpu").eval()
    before, after, _, _ = simulate_clearing()
    stacked = np.concatenate([before, after]).astype(np.float32)
    raw = np.stack([stacked[:, r : r + 32, c : c + 32] for r, c in ((0, 0), (40, 64), (96, 128), (160, 32), (200, 280))])
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"raw": raw})[0]
    with torch.no_grad():
        expected = model.predict_proba(torch.from_numpy(raw)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_siamese_training_step_makes_no_host_sync(siamese_run, train_config):
    """Taking the dates apart happens on the device (index buffers), as the early-fusion step does."""
    from tests.training.test_sync_free import CountSyncs

    train(train_config(["experiment=forest_loss", f"data.root={siamese_run['root']}",
                        f"data.layout.band_names=[{','.join(BANDS)}]", "model.input_pool=1", "model.fusion=siamese",
                        "test=false", "data.batch_size=16", "+trainer.limit_train_batches=4",
                        "+trainer.limit_val_batches=1", "+callbacks.sync._target_=tests.training.test_sync_free.CountSyncs"]))
    assert CountSyncs.steps == 4
    assert CountSyncs.calls == []
