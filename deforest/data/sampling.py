"""The order training draws tiles in, and the seeds of the augmentation draws.

``data.sampler``: ``shuffle`` (each training tile once per epoch) is the DataLoader's own;
``balanced`` is :class:`BalancedSampler` with :func:`balanced_weights`. Augmentation seeds come
from :func:`augmentation_seed` alone, per DDP rank and DataLoader worker.
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DistributedSampler

from deforest.core.vocabulary import MULTICLASS


def balanced_weights(targets: np.ndarray, task: str) -> np.ndarray:
    """Each training sample's draw weight for ``data.sampler=balanced`` (float64, sums to 1).

    Multi-class: the inverse count of its class, so every class is drawn equally often.
    Multi-label (``targets`` multi-hot ``[N, C]``): the inverse count of its *rarest* label. A
    sample is one draw however many labels it carries, so no per-label weights can make every
    label equally frequent; weighting by the rarest label repeats the samples that carry rare
    labels (they are the scarce ones) and draws the common labels mostly as their companions.
    A sample without a label counts as carrying the commonest one.
    """
    targets = np.asarray(targets)
    if task == MULTICLASS:
        counts = np.bincount(targets, minlength=int(targets.max()) + 1).astype(np.float64)
        weights = 1.0 / counts[targets]
    else:
        positive = targets > 0
        counts = positive.sum(axis=0).astype(np.float64)
        per_label = np.where(positive, counts[None, :], np.inf).min(axis=1)
        weights = 1.0 / np.where(np.isfinite(per_label), per_label, counts.max())
    return weights / weights.sum()


class BalancedSampler(DistributedSampler):
    """Draws ``len(weights)`` training indices per epoch with replacement, index ``i`` with
    probability ``weights[i]``.

    One global draw per (seed, epoch), the same on every rank (a generator of its own, not the
    global RNG); rank ``r`` of ``num_replicas`` takes the draws at positions ``r, r + R, ...``,
    so the ranks' shares are disjoint and together are the single-process draw (padded to a
    multiple of ``num_replicas``). A :class:`DistributedSampler` so that Lightning neither wraps
    it under DDP nor forgets its ``set_epoch``.
    """

    def __init__(self, weights: np.ndarray, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        # DistributedSampler's own __init__ would ask torch.distributed for the world size
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        self.seed, self.num_replicas, self.rank, self.epoch = int(seed), int(num_replicas), int(rank), 0
        self.num_samples = -(-len(self.weights) // self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        draw = torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator)
        return iter(draw[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def augmentation_seed(seed: int, rank: int, worker: int | None = None) -> int:
    """The seed of one DDP rank's augmentation draws (``worker``: of one of its DataLoader
    workers; ``None``: its main process).

    The one place augmentation seeds come from: every rank and worker draws its own sequence
    (a seed without the rank gives every rank the same flips of different tiles), and the same
    ``(seed, rank, worker)`` draws the same sequence again.
    """
    entropy = [seed % 2**64, rank, 0 if worker is None else worker + 1]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """Lightning's worker seeding, plus the worker's augmentation seed: from the worker's torch
    seed (new each epoch, derived from the run's seed), its rank and its id."""
    pl_worker_init_function(worker_id, rank)
    info = torch.utils.data.get_worker_info()
    if info.dataset.augment is not None:
        info.dataset.augment.set_random_seed(augmentation_seed(info.seed, rank, worker_id))
