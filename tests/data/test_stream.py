"""Packs in object storage: deforest-pack out=s3://... and data.packed=s3://... against a real S3 API
server (moto's server mode on 127.0.0.1), endpoint and credentials from the standard AWS variables."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import fsspec
import numpy as np
import pytest
import s3fs
import torch
from hydra import compose, initialize_config_module

from deforest.cli.pack import pack
from deforest.cli.train import build_datamodule, train
from deforest.core.errors import DatasetError
from deforest.data.layouts import FolderLayout
from deforest.data.stores.format import INDEX, ORDER, STATS, TARGETS, TILES, ZARR
from deforest.data.stores.pack import PackedLayout
from deforest.data.stores.packing import pack_dataset
from deforest.data.stores.remote import RemotePack, upload_pack
from deforest.data.stores.streaming import StreamedSplit

REPO = Path(__file__).resolve().parents[2]
EUROSAT_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]


@pytest.fixture(scope="module")
def s3_bucket():
    """A moto S3 server on a free port of 127.0.0.1 with one bucket; AWS_* point at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        # fsspec caches S3 filesystems by arguments, not by the endpoint read from the
        # environment: one made for another test module's server would point at a closed port
        s3fs.S3FileSystem.clear_instance_cache()
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("packs")
        yield "s3://packs"
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="module")
def s3_pack(s3_bucket, tmp_path_factory) -> str:
    """The shipped EuroSAT sample packed straight to the bucket by the ``pack`` config."""
    url = f"{s3_bucket}/eurosat"
    cache = tmp_path_factory.mktemp("pack-cache")
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        cfg = compose("pack", overrides=[f"paths.root_dir={REPO}", f"paths.cache_dir={cache}", f"out={url}",
                                         "chunk_tiles=32"])
    result = pack(cfg)
    assert result.tiles == 270
    return url


@pytest.mark.slow
def test_s3_round_trip_serves_the_file_pixels(train_config, s3_pack):
    files = build_datamodule(train_config([]).data)
    remote = build_datamodule(train_config([f"data.packed={s3_pack}"]).data)
    files.setup("fit")
    remote.setup("fit")
    assert isinstance(remote.layout, RemotePack) and remote.assignment == files.assignment
    assert remote.input_spec.normalization.mean == pytest.approx(files.input_spec.normalization.mean)
    for split in ("val", "test"):
        loader = remote._loader(split, shuffle=False)
        assert isinstance(loader.dataset, StreamedSplit)
        seen = []
        for batch in loader:
            batch = remote.on_after_batch_transfer(batch, 0)
            expected = torch.stack([files.datasets[split][i]["image"] for i in batch["index"].tolist()])
            assert torch.equal(batch["image"], expected)
            seen += batch["index"].tolist()
        assert sorted(seen) == list(range(len(files.datasets[split])))  # one process: each tile once
    metrics = train(train_config([f"data.packed={s3_pack}", "+trainer.limit_train_batches=3", "data.num_workers=1"]))
    assert 0.0 <= metrics["test/accuracy"] <= 1.0


def test_ranks_read_disjoint_chunks(train_config, s3_pack):
    remote = build_datamodule(train_config([f"data.packed={s3_pack}", "data.batch_size=8"]).data)
    remote.setup("fit")
    split = StreamedSplit(remote.datasets["train"], 8, train=True, seed=0)
    shares = {r: split._share(r, 2, epoch=0) for r in (0, 1)}
    chunks = shares[0] + shares[1]
    assert sorted(chunks) == sorted(split.by_chunk) and len(set(chunks)) == len(chunks)  # disjoint, complete
    assert split._share(0, 2, epoch=1) != shares[0] or len(split.by_chunk) < 4  # reshuffled per epoch
    wanted = split._target(2, 0)
    batches = list(split._cut([(c, split.by_chunk[c]) for c in shares[1]], np.random.default_rng(0), wanted))
    tiles = [i for b in batches for i in b["index"].tolist()]
    allowed = {int(i) for c in shares[1] for i in split.by_chunk[c]}
    assert len(tiles) == len(set(tiles)) and set(tiles) <= allowed  # only its own chunks, each tile once
    assert len(batches) == wanted and all(len(b["index"]) == 8 for b in batches)


def test_later_epochs_read_the_chunk_cache(train_config, s3_bucket, s3_pack, tmp_path):
    """The first epoch keeps every chunk it streams; with the chunk objects then deleted from
    the server, the next epoch still serves the files' pixels, from local disk."""
    url = f"{s3_bucket}/eurosat-cached"
    fs = fsspec.filesystem("s3")
    fs.copy(s3_pack, url, recursive=True)
    files = build_datamodule(train_config([]).data)
    remote = build_datamodule(train_config([f"data.packed={url}", f"paths.cache_dir={tmp_path}"]).data)
    files.setup("fit")
    remote.setup("fit")
    loader = remote.train_dataloader()
    first = [i for batch in loader for i in batch["index"].tolist()]
    cache = remote.layout.cache
    assert len(list(cache.folder.glob("*.done"))) == len(loader.dataset.by_chunk)  # every training chunk kept
    fs.rm(f"{url}/tiles.zarr/c", recursive=True)
    second = []
    for batch in loader:
        batch = remote.on_after_batch_transfer(batch, 0)
        expected = torch.stack([files.datasets["train"][i]["image"] for i in batch["index"].tolist()])
        assert torch.equal(batch["image"], expected)
        second += batch["index"].tolist()
    assert len(second) == len(set(second)) == len(first) and set(second) <= set(range(len(files.datasets["train"])))


def test_per_tile_augmentation_is_applied_to_streamed_batches(train_config, s3_pack):
    flip = ["data.augment=[{_target_:albumentations.HorizontalFlip,p:1.0}]"]
    files = build_datamodule(train_config(flip).data)
    remote = build_datamodule(train_config([*flip, f"data.packed={s3_pack}"]).data)
    files.setup("fit")
    remote.setup("fit")
    batch = remote.on_after_batch_transfer(next(iter(remote.train_dataloader())), 0)
    expected = torch.stack([files.datasets["train"][i]["image"] for i in batch["index"].tolist()])
    assert batch["image"].dtype == torch.float32 and torch.equal(batch["image"], expected)
    assert not torch.equal(expected, expected.flip(-1))  # the flip shows


@pytest.fixture(scope="module")
def large_pack(tmp_path_factory) -> Path:
    """A local pack of 2,700 tiles: the EuroSAT sample ten times over (hard links under class
    folders), in index order as a folder dataset is packed: train then test, class by class."""
    sample = REPO / "data" / "eurosat-ms"
    root = tmp_path_factory.mktemp("eurosat-x10")
    for tif in sample.rglob("*.tif"):
        folder = root / tif.parent.relative_to(sample)
        folder.mkdir(parents=True, exist_ok=True)
        for copy in range(10):
            try:
                os.link(tif, folder / f"{tif.stem}_{copy}.tif")
            except OSError:  # another file system
                shutil.copyfile(tif, folder / f"{tif.stem}_{copy}.tif")
    out = tmp_path_factory.mktemp("eurosat-x10-pack")
    assert pack_dataset(FolderLayout(root, EUROSAT_BANDS), out).tiles == 2700
    return out


@pytest.fixture(scope="module")
def large_s3_pack(s3_bucket, large_pack) -> str:
    """``large_pack`` uploaded the way deforest-pack uploads, in chunks of 64 rows (42 chunks)."""
    url = f"{s3_bucket}/eurosat-x10"
    upload_pack(large_pack, url, chunk_tiles=64)
    return url


def _distinct_classes(batches) -> float:
    return float(np.mean([len(set(t.tolist())) for t in batches]))


@pytest.mark.slow
def test_streamed_batches_mix_classes_as_a_shuffled_loader(train_config, large_s3_pack, caplog):
    """A pack stored class by class must not train on one class at a time: the classes per
    training batch match a plain shuffled DataLoader's over the same split."""
    with caplog.at_level(logging.WARNING, logger="deforest.data.stores.streaming"):
        remote = build_datamodule(train_config([f"data.packed={large_s3_pack}", "data.batch_size=16"]).data)
        remote.setup("fit")
        loader = remote.train_dataloader()
    assert "sorted" not in caplog.text  # a shuffled upload is not reported as class-sorted
    targets = torch.as_tensor(np.asarray(remote.datasets["train"].targets))
    assert len(targets) > 10 * 64 and len(set(targets.tolist())) == 10  # many chunks, ten classes
    streamed = [batch["target"] for _ in range(2) for batch in loader]
    plain = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(targets), batch_size=16, shuffle=True,
                                        drop_last=True, generator=torch.Generator().manual_seed(0))
    shuffled = [t for _ in range(5) for (t,) in plain]
    expected = _distinct_classes(shuffled)
    assert expected > 7.5  # 16 draws from ten classes of about equal size
    assert _distinct_classes(streamed) == pytest.approx(expected, rel=0.1)
    largest = max(int(torch.bincount(t).max()) for t in streamed)
    assert largest <= max(int(torch.bincount(t).max()) for t in shuffled) + 2  # train/count_max as a shuffled loader's


@pytest.mark.slow
def test_each_training_tile_once_per_epoch_on_every_rank(train_config, large_s3_pack):
    """Per epoch every rank yields floor(min share / batch) full batches of its own chunks'
    tiles, no tile twice across ranks; left out are the tiles beyond that count (world 1:
    fewer than a batch)."""
    remote = build_datamodule(train_config([f"data.packed={large_s3_pack}", "data.batch_size=16"]).data)
    remote.setup("fit")
    split = StreamedSplit(remote.datasets["train"], 16, train=True, seed=0)
    n = len(remote.datasets["train"])
    orders = {}
    for world in (1, 2):
        for epoch in (0, 1):
            shares = [sum(len(split.by_chunk[c]) for c in split._share(r, world, epoch)) for r in range(world)]
            per_rank = [[b["index"].tolist() for b in split.batches(r, world, epoch)] for r in range(world)]
            assert all(len(batches) == min(shares) // 16 for batches in per_rank)  # no rank waits for another
            assert all(len(b) == 16 for batches in per_rank for b in batches)
            tiles = [i for batches in per_rank for b in batches for i in b]
            assert len(tiles) == len(set(tiles)) == world * (min(shares) // 16) * 16  # each tile at most once
            assert set(tiles) <= set(range(n))
            assert n - len(tiles) < (16 if world == 1 else 2 * 16 + max(shares) - min(shares))
            for r in range(world):  # a rank's tiles are those of its own chunks
                own = {int(i) for c in split._share(r, world, epoch) for i in split.by_chunk[c]}
                assert {i for b in per_rank[r] for i in b} <= own
            orders[world, epoch] = tiles
    assert orders[1, 0] != orders[1, 1] and orders[2, 0] != orders[2, 1]  # reshuffled each epoch


@pytest.mark.slow
def test_pack_uploaded_in_index_order_is_read_and_reported(train_config, s3_bucket, large_pack, caplog):
    """A pack in object storage stored in index order (as uploads were before rows were
    shuffled) is still read right, and training warns once that its chunks are class-sorted."""
    url = f"{s3_bucket}/eurosat-x10-index-order"
    import zarr
    from zarr.storage import FsspecStore

    tiles = np.load(large_pack / TILES, mmap_mode="r")
    array = zarr.create_array(store=FsspecStore.from_url(f"{url}/{ZARR}", read_only=False), shape=tiles.shape,
                              chunks=(64, *tiles.shape[1:]), dtype=tiles.dtype, compressors=None)
    for start in range(0, len(tiles), 64):
        array[start : start + 64] = tiles[start : start + 64]
    fs = fsspec.filesystem("s3")
    for name in (TARGETS, STATS, INDEX):
        fs.put_file(str(large_pack / name), f"packs/eurosat-x10-index-order/{name}")
    with caplog.at_level(logging.WARNING, logger="deforest.data.stores.streaming"):
        remote = build_datamodule(train_config([f"data.packed={url}", "data.batch_size=16"]).data)
        remote.setup("fit")
        loader = remote.train_dataloader()
        loader = remote.train_dataloader()
    warnings = [r.getMessage() for r in caplog.records if "sorted" in r.getMessage()]
    assert len(warnings) == 1 and url in warnings[0] and "deforest-pack" in warnings[0]
    local = PackedLayout(large_pack, check=False)
    dataset = remote.datasets["train"]
    batch = next(iter(loader))
    rows = local.rows_of([dataset.sources[i] for i in batch["index"].tolist()])
    expected = torch.from_numpy(np.ascontiguousarray(local.tiles[rows][:, np.asarray(dataset.bands) - 1]))
    assert torch.equal(batch["image"], expected)


def test_pack_files_are_replaced_whole_while_ranks_read_them(s3_pack, tmp_path):
    """Ranks of one machine fetch the pack's small files into the same folder at each start:
    a reader there never sees a half-written file, and no temporary file is left."""
    folder = RemotePack(s3_pack, tmp_path, cache_chunks=False).path
    names = sorted(p.name for p in folder.iterdir())
    expected = {name: (folder / name).read_bytes() for name in (INDEX, TARGETS, STATS)}
    errors, done = [], threading.Event()

    def rank() -> None:
        try:
            for _ in range(15):
                RemotePack(s3_pack, tmp_path, cache_chunks=False)
        except Exception as err:  # noqa: BLE001 - a rank's failure is what the test looks for
            errors.append(err)

    ranks = [threading.Thread(target=rank) for _ in range(2)]
    for thread in ranks:
        thread.start()
    reads, partial = 0, set()
    while any(thread.is_alive() for thread in ranks):
        for name, data in expected.items():
            got = (folder / name).read_bytes()
            reads += 1
            if got != data:
                partial.add(f"{name}: {len(got)} of {len(data)} bytes")
    for thread in ranks:
        thread.join()
    assert reads > 0 and not errors and not partial
    assert sorted(p.name for p in folder.iterdir()) == names  # no temporary file left


def test_damaged_row_order_is_one_clear_error(s3_bucket, s3_pack, tmp_path):
    """The stored row order of an upload is checked at each start: a damaged one stops with one line."""
    url = f"{s3_bucket}/eurosat-bad-order"
    fs = fsspec.filesystem("s3")
    fs.copy(s3_pack, url, recursive=True)
    order = np.load(RemotePack(url, tmp_path, cache_chunks=False).path / ORDER)
    assert sorted(order.tolist()) == list(range(270)) and order.tolist() != list(range(270))  # stored shuffled
    for bad in (order[:-1], np.zeros_like(order)):
        with fs.open(f"{url}/{ORDER}", "wb") as file:
            np.save(file, bad)
        with pytest.raises(DatasetError, match=rf"^{url}/order\.npy: not an order of the pack's 270 rows; re-upload"):
            RemotePack(url, tmp_path, cache_chunks=False)
    fs.pipe_file(f"{url}/{ORDER}", b"")  # a truncated upload
    with pytest.raises(DatasetError, match=rf"^{url}/order\.npy: unreadable \(.+\); re-upload the pack"):
        RemotePack(url, tmp_path, cache_chunks=False)


def test_balanced_sampler_on_a_streamed_pack_is_refused_in_one_line(train_config, s3_pack):
    # streamed chunks cannot serve tiles drawn one by one; a local pack can
    with pytest.raises(DatasetError) as refused:
        build_datamodule(train_config([f"data.packed={s3_pack}", "data.sampler=balanced"]).data)
    assert str(refused.value) == (
        f"{s3_pack}: data.sampler=balanced draws tiles one by one and a pack in object storage streams whole "
        "chunks: copy the pack to a local folder, or set data.sampler=null")


def test_default_sampler_streams_a_multilabel_pack_in_object_storage(train_config, s3_bucket, bigearthnet_root, tmp_path):
    """``data.sampler=auto`` is the balanced draw for multi-label data, except from a pack in object
    storage, which serves whole chunks: there it streams them shuffled instead of refusing."""
    from deforest.data.bigearthnet import BigEarthNetLayout

    pack_dataset(BigEarthNetLayout(bigearthnet_root, size=60), tmp_path / "ben")
    url = f"{s3_bucket}/ben-auto"
    upload_pack(tmp_path / "ben", url)
    remote = build_datamodule(train_config(["data=bigearthnet", f"data.packed={url}", "data.batch_size=4",
                                            f"paths.cache_dir={tmp_path / 'cache'}"]).data)
    remote.setup("fit")
    assert remote.task == "multilabel" and remote.sampler == "shuffle"
    batch = next(iter(remote.train_dataloader()))
    assert batch["image"].shape[0] == 4 and batch["target"].shape[1] == len(remote.class_names) > 1
    local = build_datamodule(train_config(["data=bigearthnet", f"data.packed={tmp_path / 'ben'}"]).data)
    local.setup("fit")
    assert local.sampler == "balanced"
