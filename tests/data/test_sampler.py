"""data.sampler=balanced: class frequencies of the drawn training tiles, determinism per seed
and epoch, each DDP rank's share of one global draw; on the real EuroSAT sample made
imbalanced and on the long-tailed multi-label mosaics cut from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest

from deforest.data.sampling import BalancedSampler, balanced_weights
from deforest.runs.build import build_datamodule
from tests.conftest import REPO

IMBALANCE = "data.imbalance={Forest:1.0,AnnualCrop:1.0,*:0.25}"


def _fit_datamodule(train_config, overrides):
    dm = build_datamodule(train_config(overrides).data)
    dm.setup("fit")
    return dm


def test_balanced_sampler_draws_classes_near_uniformly(train_config):
    dm = _fit_datamodule(train_config, [IMBALANCE, "data.sampler=balanced"])
    targets = dm.datasets["train"].targets
    counts = np.bincount(targets, minlength=10)
    assert counts.max() >= 4 * counts.min()  # the training split is imbalanced: 22-24 vs 5-6 tiles
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, BalancedSampler)
    drawn = []
    for epoch in range(8):  # the real loader, batches of real tiles, one epoch after another
        loader.sampler.set_epoch(epoch)
        drawn += [t for batch in loader for t in batch["target"].tolist()]
    assert len(drawn) == 8 * (len(targets) // dm.batch_size) * dm.batch_size  # epoch length = dataset length
    share = np.bincount(drawn, minlength=10) / len(drawn)
    # without the sampler the rarest class is 5/102 = 5% of the draws, the commonest 24%
    assert share.min() > 0.07 and share.max() < 0.13, share.round(3)


def test_balanced_sampler_is_deterministic_per_seed_and_new_each_epoch(train_config):
    dm = _fit_datamodule(train_config, [IMBALANCE, "data.sampler=balanced", "seed=3"])
    first = list(dm.train_dataloader().sampler)
    again = _fit_datamodule(train_config, [IMBALANCE, "data.sampler=balanced", "seed=3"]).train_dataloader().sampler
    assert list(again) == first
    again.set_epoch(1)
    assert list(again) != first
    other = _fit_datamodule(train_config, [IMBALANCE, "data.sampler=balanced", "seed=4"]).train_dataloader().sampler
    assert list(other) != first


def test_two_ranks_share_one_global_draw(train_config):
    dm = _fit_datamodule(train_config, [IMBALANCE, "data.sampler=balanced"])
    weights = balanced_weights(dm.datasets["train"].targets, "multiclass")
    n = len(weights)
    assert n % 2 == 0
    for epoch in (0, 5):
        one = BalancedSampler(weights, seed=7, num_replicas=1, rank=0)
        ranks = [BalancedSampler(weights, seed=7, num_replicas=2, rank=r) for r in (0, 1)]
        for s in (one, *ranks):
            s.set_epoch(epoch)
        single, shares = list(one), [list(s) for s in ranks]
        assert len(single) == n and [len(s) for s in shares] == [n // 2, n // 2]
        # disjoint shares (alternate positions) of the same global draw: together its multiset
        assert shares[0] == single[0::2] and shares[1] == single[1::2]
        assert Counter(shares[0]) + Counter(shares[1]) == Counter(single)


def test_balanced_sampler_lifts_the_rarest_label_of_the_long_tail(train_config, eurosat_root, tmp_path):
    from deforest.data.longtail import build_longtail

    record = build_longtail(eurosat_root, tmp_path / "lt", seed=0, sizes={"train": 600, "val": 60, "test": 60})
    rows = ["data=manifest", f"data.root={tmp_path / 'lt'}", "data.layout.task=multilabel"]
    plain = _fit_datamodule(train_config, [*rows, "data.sampler=shuffle"])
    balanced = _fit_datamodule(train_config, [*rows, "data.sampler=balanced"])
    names = balanced.class_names
    rarest = names.index(record["tail_order"][-1])
    targets = balanced.datasets["train"].targets
    base = targets[:, rarest].mean()
    assert 0.01 < base < 0.06  # the rarest label is in a few percent of the training mosaics
    sampler = balanced.train_dataloader().sampler
    drawn = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        drawn.append(targets[list(sampler)])
    drawn = np.concatenate(drawn)
    # each mosaic weighted by the inverse count of its rarest label: the rare label is drawn
    # several times as often as it occurs, the commonest label less often
    assert drawn[:, rarest].mean() > 3 * base
    commonest = names.index(record["tail_order"][0])
    assert drawn[:, commonest].mean() < targets[:, commonest].mean()
    assert plain.train_dataloader().sampler.__class__.__name__ == "RandomSampler"


def test_default_sampler_balances_multilabel_data_and_shuffles_multiclass(train_config, bigearthnet_root):
    """``data.sampler=auto`` (the default): the balanced draw for a multi-label dataset (real BigEarthNet
    patches), each tile once per epoch for a multi-class one (the EuroSAT sample)."""
    assert train_config([]).data.sampler == "auto"
    multilabel = _fit_datamodule(train_config, ["data=bigearthnet", f"data.root={bigearthnet_root}"])
    assert multilabel.task == "multilabel"
    assert isinstance(multilabel.train_dataloader().sampler, BalancedSampler)
    assert multilabel.val_dataloader().sampler.__class__.__name__ == "SequentialSampler"
    multiclass = _fit_datamodule(train_config, [IMBALANCE])
    assert multiclass.train_dataloader().sampler.__class__.__name__ == "RandomSampler"
    shuffled = _fit_datamodule(train_config, ["data=bigearthnet", f"data.root={bigearthnet_root}", "data.sampler=null"])
    assert shuffled.train_dataloader().sampler.__class__.__name__ == "RandomSampler"


def test_unknown_sampler_is_refused_in_one_line(train_config):
    with pytest.raises(ValueError, match=r"^data.sampler must be null, auto, shuffle or balanced, not 'weighted'$"):
        build_datamodule(train_config(["data.sampler=weighted"]).data)


class SeenByRank(pl.Callback):
    """Writes, per DDP rank, the training tiles of each epoch's batches in the order drawn."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.seen: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.seen.setdefault(trainer.current_epoch, []).extend(batch["index"].tolist())

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"seen-{trainer.global_rank}.json").write_text(json.dumps(self.seen))


@pytest.mark.slow
def test_two_gloo_ranks_draw_their_shares_of_the_global_draw(train_config, tmp_path):
    """Two real DDP processes (trainer=ddp_cpu) with two DataLoader workers each: each rank
    trains on its share of the seeded global draw, a new one in the second epoch."""
    dm = _fit_datamodule(train_config, [IMBALANCE, "data.sampler=balanced"])
    weights = balanced_weights(dm.datasets["train"].targets, "multiclass")
    batch = 8
    args = [
        "trainer=ddp_cpu", IMBALANCE, "data.sampler=balanced", "data.num_workers=2", f"data.batch_size={batch}",
        "trainer.max_epochs=2", "model.width=8", "model.tta=false", "test=false", "trainer.enable_progress_bar=false",
        "report.enabled=false", f"hydra.run.dir={tmp_path / 'run'}",
        "+callbacks.seen._target_=tests.data.test_sampler.SeenByRank", f"+callbacks.seen.out={tmp_path / 'seen'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DEFOREST_LOG_DIR": str(tmp_path / "logs"),
           "DEFOREST_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "deforest.cli.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    seen = [json.loads((tmp_path / "seen" / f"seen-{r}.json").read_text()) for r in (0, 1)]
    for epoch in (0, 1):
        share = len(weights) // 2 // batch * batch  # whole batches of each rank's half
        for rank in (0, 1):
            sampler = BalancedSampler(weights, seed=42, num_replicas=2, rank=rank)
            sampler.set_epoch(epoch)
            assert seen[rank][str(epoch)] == list(sampler)[:share]
    assert seen[0]["0"] != seen[0]["1"]
