"""Accuracy of the default model's two heads on the shipped EuroSAT sample; prints a table, writes JSON.

A plain loop (tiles in memory, no Lightning, no checkpoint selection: the final weights of
the one-cycle schedule) trains the default network, the small CNN on tiles pooled to 32 px,
and the band-statistics head side by side, as ``deforest-train`` does: the same
dynamically weighted loss for both, random flips/rotations, AdamW at 1e-3, batch 16, 120
epochs, 10% of each class held out as in the pipeline, the CNN without the atmospheric
bands B01, B09 and B10 (``model.network_exclude_bands``; ``--cnn-bands all`` feeds it all
13). It reports the accuracy of the CNN alone, the statistics head alone and their averaged
logits, on the 54 test tiles and in 4-fold cross-validation inside the 216 training tiles,
which never looks at the test tiles.

    python benchmarks/heads_study.py --seeds 0 1 2 3            # ~1.5 min per fit on one CPU core
    python benchmarks/heads_study.py --seeds 0 1 2 3 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import rasterio
import torch

from deforest.training.losses import DynamicWeightedLoss
from deforest.models.networks import BandStatistics, build_backbone
from deforest.data.splits import iterative_stratification
from deforest.data.transforms import BandNormalizer, d4_views, random_d4

REPO = Path(__file__).resolve().parents[1]
HEADS = ("cnn", "band_statistics", "average")
# EuroSAT's band order: B01 B02 B03 B04 B05 B06 B07 B08 B09 B10 B11 B12 B8A
CNN_BANDS = {"all": list(range(13)), "no-atmospheric": [1, 2, 3, 4, 5, 6, 7, 10, 11, 12]}


def load_sample(root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{split: (tiles [N, 13, 64, 64] float, labels [N])}`` for the given train/test folders."""
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    out = {}
    for split in ("train", "test"):
        tiles, labels = [], []
        for label, name in enumerate(classes):
            for path in sorted((root / split / name).glob("*.tif")):
                with rasterio.open(path) as src:
                    tiles.append(src.read().astype(np.float32))
                labels.append(label)
        out[split] = (torch.from_numpy(np.stack(tiles)), torch.tensor(labels))
    return out


def stratified(labels: torch.Tensor, fractions: dict[str, float], seed: int) -> np.ndarray:
    """A key of ``fractions`` per tile, by the pipeline's own stratified split."""
    one_hot = np.eye(int(labels.max()) + 1, dtype=bool)[labels.numpy()]
    return iterative_stratification(one_hot, fractions, seed)


def fit_and_score(
    train: tuple[torch.Tensor, torch.Tensor], evaluate: tuple[torch.Tensor, torch.Tensor],
    seed: int, epochs: int, device: str, cnn_bands: list[int],
) -> dict[str, float]:
    """Train both heads on ``train`` (less 10% held out per class), accuracy of each on ``evaluate``."""
    torch.manual_seed(seed)
    x, y = train
    # the pipeline's 10% validation share, carved as deforest-train carves it, stays unused
    keep = torch.from_numpy(stratified(y, {"train": 0.9, "val": 0.1}, seed) == "train")
    x, y = x[keep], y[keep]
    logs = torch.log1p(x)
    normalizer = BandNormalizer(logs.mean(dim=(0, 2, 3)).tolist(), logs.std(dim=(0, 2, 3)).tolist(), log_scale=True)
    x, y = normalizer(x).to(device), y.to(device)
    x_eval, y_eval = normalizer(evaluate[0]).to(device), evaluate[1].to(device)
    classes = int(train[1].max()) + 1
    cnn_net = build_backbone("small_cnn", len(cnn_bands), classes, width=32, dropout=0.2, input_pool=2).to(device)
    band_index = torch.tensor(cnn_bands, device=device)

    def cnn(tiles: torch.Tensor) -> torch.Tensor:
        return cnn_net(tiles.index_select(1, band_index))

    stats = BandStatistics(x.shape[1], classes).to(device)
    params = list(cnn_net.parameters()) + list(stats.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    batch = 16
    steps = len(y) // batch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=epochs * steps, pct_start=0.2)
    criterion = DynamicWeightedLoss("multiclass", classes, scheme="inverse_count", label_smoothing=0.1).to(device)
    for _ in range(epochs):
        cnn_net.train()
        stats.train()
        order = torch.randperm(len(y), device=device)
        for step in range(steps):
            idx = order[step * batch:(step + 1) * batch]
            tiles = random_d4(x[idx])
            loss = criterion([cnn(tiles), stats(tiles)], y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    cnn_net.eval()
    stats.eval()
    with torch.no_grad():  # test-time augmentation over the eight views, as model.tta=true
        views = d4_views(x_eval)
        logits = {
            "cnn": torch.stack([cnn(v) for v in views]),
            "band_statistics": torch.stack([stats(v) for v in views]),
        }
        logits["average"] = (logits["cnn"] + logits["band_statistics"]) / 2
        return {
            head: float((value.softmax(dim=2).mean(dim=0).argmax(dim=1) == y_eval).float().mean())
            for head, value in logits.items()
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--folds", type=int, nargs="*", default=[0, 1, 2, 3], help="cross-validation folds to run")
    parser.add_argument("--no-test", action="store_true", help="skip the fits scored on the test tiles")
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cnn-bands", choices=sorted(CNN_BANDS), default="no-atmospheric")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "eurosat-ms")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "heads_study.json")
    args = parser.parse_args()
    sample = load_sample(args.data)
    x, y = sample["train"]
    fold_of = torch.from_numpy(stratified(y, {str(k): 0.25 for k in range(4)}, 123).astype(int))
    tasks = [] if args.no_test else [("test", -1)]
    tasks += [("cv", fold) for fold in args.folds]
    runs = []
    for seed in args.seeds:
        for kind, fold in tasks:
            if kind == "test":
                train, evaluate = sample["train"], sample["test"]
            else:
                inside = fold_of != fold
                train, evaluate = (x[inside], y[inside]), (x[~inside], y[~inside])
            start = time.perf_counter()
            scores = fit_and_score(train, evaluate, seed, args.epochs, args.device, CNN_BANDS[args.cnn_bands])
            runs.append({"seed": seed, "split": kind, "fold": fold, **scores, "seconds": time.perf_counter() - start})
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    summary = {}
    print("| scored on | fits | " + " | ".join(HEADS) + " |\n|---|---|" + "---|" * len(HEADS))
    for kind in ("test", "cv"):
        rows = [r for r in runs if r["split"] == kind]
        if rows:
            summary[kind] = {head: float(np.mean([r[head] for r in rows])) for head in HEADS}
            cells = " | ".join(f"{summary[kind][head]:.3f}" for head in HEADS)
            print(f"| {'54 test tiles' if kind == 'test' else '4-fold CV, training tiles'} | {len(rows)} | {cells} |")
    record = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__} {args.device}".strip(),
        "cnn_bands": args.cnn_bands,
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
