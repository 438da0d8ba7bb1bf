"""DDP with two real gloo processes (``trainer=ddp_cpu``), over files with two DataLoader
workers each and over a local pack (gathered in each rank's main process): every training
tile once per epoch, a bad batch on one rank does not hang the other, the ranks stay
identical, and validation metrics count each tile once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from deforest.cli.train import build_datamodule
from deforest.data.layouts import FolderLayout
from deforest.data.stores.packing import pack_dataset

REPO = Path(__file__).resolve().parents[2]


class DDPProbe(pl.Callback):
    """Records, per rank, the training tiles of each batch, empties one batch of rank 1 (all
    its tiles bad), puts a NaN into one batch of rank 0, and writes what validation counted."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.seen: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.seen += batch["index"].tolist()
        if trainer.global_rank == 1 and batch_idx == 1:  # a batch of only bad tiles on one rank
            for key in ("image", "target", "index"):
                batch[key] = batch[key][:0]
        if trainer.global_rank == 0 and batch_idx == 3:  # a non-finite loss on the other
            batch["image"][0, 0, 0, 0] = float("nan")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        predictions = pl_module.predictions["val"]
        correct = (predictions["probs"].argmax(dim=1) == predictions["target"]).float().mean()
        self._write("val", {"index": predictions["index"].tolist(), "accuracy": float(correct),
                            "logged": float(trainer.callback_metrics["val/accuracy"])})

    def on_train_end(self, trainer, pl_module) -> None:
        weights = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        self._write("train", {"seen": self.seen, "weights": weights[:64].tolist(), "sum": float(weights.double().sum())})

    def _write(self, kind: str, record: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{kind}-{torch.distributed.get_rank()}.json").write_text(json.dumps(record))


@pytest.mark.slow
@pytest.mark.parametrize("source", ["files", "pack"])
def test_ddp_two_ranks_two_workers(train_config, eurosat_root, tmp_path, source):
    data = []
    if source == "pack":
        pack_dataset(FolderLayout(eurosat_root), tmp_path / "pack")
        data = [f"data.packed={tmp_path / 'pack'}"]
    dm = build_datamodule(train_config(data).data)
    dm.setup("fit")
    n_train, n_val = len(dm.datasets["train"]), len(dm.datasets["val"])
    per_rank = n_train // 2
    batch = max(b for b in range(2, 17) if per_rank % b == 0)  # nothing dropped, nothing padded
    assert n_train % 2 == 0 and per_rank // batch >= 4, (n_train, batch)
    probe = tmp_path / "probe"
    args = [
        "trainer=ddp_cpu", *data, "data.num_workers=2", f"data.batch_size={batch}",
        "model.nonfinite_loss=skip", "trainer.max_epochs=1", "model.width=8", "model.tta=false", "test=false",
        "trainer.enable_progress_bar=false", "report.enabled=false", f"hydra.run.dir={tmp_path / 'run'}",
        "+callbacks.probe._target_=tests.data.test_ddp_data.DDPProbe", f"+callbacks.probe.out={probe}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DEFOREST_LOG_DIR": str(tmp_path / "logs"),
           "DEFOREST_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "deforest.cli.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # a hang ends here, failed
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    train = [json.loads((probe / f"train-{r}.json").read_text()) for r in (0, 1)]
    seen = train[0]["seen"] + train[1]["seen"]
    assert sorted(seen) == list(range(n_train))  # each tile exactly once across 2 ranks (x 2 workers for files)
    assert train[0]["sum"] == train[1]["sum"] and train[0]["weights"] == train[1]["weights"]  # ranks agree
    assert all(torch.isfinite(torch.tensor(t["weights"])).all() for t in train)
    val = [json.loads((probe / f"val-{r}.json").read_text()) for r in (0, 1)]
    assert sorted(val[0]["index"]) == list(range(n_val)) and val[0]["index"] == val[1]["index"]
    assert val[0]["logged"] == pytest.approx(val[0]["accuracy"], abs=1e-6)  # each val tile counted once
    assert "skipped non-finite training loss at global step 3" in done.stdout + done.stderr
