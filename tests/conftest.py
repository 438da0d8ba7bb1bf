"""Shared fixtures: the real Hydra config, shrunk for tests, and the real data folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "eurosat-ms"
DATA = REPO / "data"


@pytest.fixture(scope="session")
def eurosat_root() -> Path:
    """The shipped EuroSAT sample (13 bands, 64x64, train/ and test/)."""
    return SAMPLE


@pytest.fixture(scope="session")
def bigearthnet_root() -> Path:
    """44 real BigEarthNet-S2 patches shipped in ``data/bigearthnet-s2``."""
    return DATA / "bigearthnet-s2"


@pytest.fixture(scope="session")
def scenes_root() -> Path:
    """The real Landsat/Sentinel scenes shipped in ``data/scenes``."""
    return DATA / "scenes"


def compose_train_config(tmp_path: Path, overrides: list[str] | None = None) -> DictConfig:
    """The real ``train`` config with test-sized settings and outputs under ``tmp_path``."""
    shrink = [
        f"paths.root_dir={REPO}",
        f"paths.output_dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "++model.width=8",  # small_cnn's setting; the other backbones ignore it
        "model.tta=false",
        "data.num_workers=0",
    ]
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        cfg = compose("train", overrides=shrink + list(overrides or []))
    with open_dict(cfg):
        cfg.paths.log_dir = str(tmp_path / "logs")
    return cfg


@pytest.fixture
def train_config(tmp_path: Path):
    """Factory: ``train_config(["data=bigearthnet", ...])`` composes the shrunk config."""
    return lambda overrides=None: compose_train_config(tmp_path, overrides)
