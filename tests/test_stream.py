"""Packs in object storage: deforest-pack out=s3://... and data.packed=s3://... against a real S3 API
server (moto's server mode on 127.0.0.1), endpoint and credentials from the standard AWS variables."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from deforest.cli.pack import pack
from deforest.cli.train import build_datamodule, train
from deforest.stream import RemotePack, StreamedSplit

REPO = Path(__file__).resolve().parents[1]


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
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("packs")
        yield "s3://packs"
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
