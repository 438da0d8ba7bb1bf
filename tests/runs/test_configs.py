"""Every option of every config group composes and builds what it names.

After lightning-hydra-template's ``test_configs.py``: the real ``train`` config, shrunk by
:func:`tests.conftest.compose_train_config`, with one group option at a time, instantiated
through the builders the commands use (:mod:`deforest.runs.build`) on the shipped data under
``data/``. An option that needs a GPU has its own values checked, then its Trainer is built
on the CPU. A yaml file added to ``conf/`` without a case here fails
``test_every_option_of_every_group_has_a_case``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.profilers import SimpleProfiler
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from omegaconf import DictConfig, OmegaConf

from deforest.runs.build import PROCESS_SETTINGS, build_datamodule, build_model, build_trainer, instantiate_group
from deforest.training.checkpoints import AtomicCheckpointIO
from deforest.training.losses import DynamicWeightedLoss
from tests.conftest import DATA, REPO, SAMPLE, compose_train_config
from tests.mapping.test_change import BANDS as PAIR_BANDS
from tests.mapping.test_change import write_pairs

CONF = REPO / "conf"
BIGEARTHNET = DATA / "bigearthnet-s2"
EUROSAT_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]


def raw(overrides: list[str] | tuple[str, ...] = (), config: str = "train", hydra: bool = False) -> DictConfig:
    """A config as shipped (not shrunk), to check an option's own values."""
    with initialize_config_module(config_module="deforest.conf", version_base="1.3"):
        return compose(config, overrides=list(overrides), return_hydra_config=hydra)


def plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=False)


def missing_keys(node: Any, prefix: str = "") -> Iterator[str]:
    """The keys left ``???`` (required on the command line), without resolving anything."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from missing_keys(value, f"{prefix}{key}.")
    elif node == "???":
        yield prefix[:-1]


def class_name(obj: Any) -> str:
    return type(obj).__name__


def first_conv(net: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One statistics cache for the module: each dataset's band statistics are computed once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def shrunk(tmp_path, cache, monkeypatch):
    """Factory: the shrunk train config with these overrides, the data found where it is shipped."""
    for name in ("DEFOREST_DATA_DIR", "BIGEARTHNET_ROOT", "BIGEARTHNET_SPLITS", "EUROSAT_ROOT", "EUROSAT_SPLITS"):
        monkeypatch.delenv(name, raising=False)
    return lambda overrides=(): compose_train_config(tmp_path, [f"paths.cache_dir={cache}", *overrides])


@pytest.fixture
def torch_flags():
    """Building a Trainer sets process-wide torch flags (deterministic algorithms,
    cudnn.benchmark): the next test gets them back as they were."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark = saved[2]


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory) -> Path:
    """Two-date tile pairs cut from the real Rondonia scene and their pairs.csv."""
    root = tmp_path_factory.mktemp("pairs")
    write_pairs(root)
    return root


def sample_manifest(folder: Path) -> Path:
    """labels.csv over the shipped EuroSAT training tiles, multi-label: River and SeaLake tiles are also water."""
    rows = ["path,labels"]
    for tile in sorted((SAMPLE / "train").rglob("*.tif")):
        label = tile.parent.name
        rows.append(f"{tile.relative_to(SAMPLE)},{label} water" if label in ("River", "SeaLake") else
                    f"{tile.relative_to(SAMPLE)},{label}")
    path = folder / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def split_lists(folder: Path, names: list[str], pattern: str) -> None:
    """Train/val/test lists over ``names`` (every fifth one to val and test), as the official files give them."""
    folder.mkdir(exist_ok=True)
    for k, split in enumerate(("train", "val", "test")):
        chosen = [n for i, n in enumerate(names) if min(i % 5, 2) == (0, 1, 2)[k]]
        (folder / pattern.format(split=split)).write_text("".join(f"{n}\n" for n in chosen))


# ---- coverage --------------------------------------------------------------------------------
#: the options composed or built below, by group
CASES = {
    "trainer": {"cpu", "gpu", "ddp", "ddp_cpu"},
    "hardware": {"gpu", "ddp"},
    "callbacks": {"default", "none"},
    "logger": {"csv", "tensorboard", "many"},
    "data": {"base", "folder", "manifest", "bigearthnet", "pairs"},
    "model": {"base", "small_cnn", "resnet18", "resnet50", "efficientnet_b0", "vit_small"},
    "loss": {"default"},
    "experiment": {"bigearthnet19_benchmark", "bigearthnet_resnet50", "eurosat_benchmark", "eurosat_resnet18",
                   "forest_loss", "imbalance", "imbalance_multilabel"},
    "debug": {"fdr", "limit", "overfit", "profiler"},
    "hparams_search": {"optuna"},
    "report": {"default"},
    "paths": {"default"},
    "hydra": {"default"},
    "hydra/launcher": {"submitit_local", "submitit_slurm"},
    "": {"train", "eval", "predict", "tile", "pack", "area", "compare", "export"},
}


def test_every_option_of_every_group_has_a_case():
    found: dict[str, set[str]] = {}
    for path in CONF.rglob("*.yaml"):
        group = path.parent.relative_to(CONF).as_posix()
        found.setdefault("" if group == "." else group, set()).add(path.stem)
    found.pop("local", None)  # one machine's settings, git-ignored
    assert found == CASES


# ---- trainer and hardware ---------------------------------------------------------------------
#: option: accelerator, devices, precision, strategy, deterministic, benchmark
TRAINERS = {
    "cpu": ("cpu", 1, "32-true", None, "warn", None),
    "gpu": ("gpu", 1, "bf16-mixed", None, False, True),
    "ddp": ("gpu", -1, "bf16-mixed", "ddp", False, True),
    "ddp_cpu": ("cpu", 2, "32-true", "ddp", "warn", None),
}


@pytest.mark.parametrize("option", sorted(TRAINERS))
def test_trainer_options_set_lightning_trainer_arguments_only(option):
    path = CONF / "trainer" / f"{option}.yaml"
    assert "@package" not in path.read_text()  # data and model settings live in conf/hardware
    keys = set(OmegaConf.load(path)) - {"defaults", "_target_"}
    accepted = set(inspect.signature(pl.Trainer).parameters) | set(PROCESS_SETTINGS)
    assert keys and keys <= accepted, keys - accepted
    # without its hardware settings a trainer option changes the trainer node and nothing else
    default = plain(raw())
    alone = plain(raw([f"trainer={option}", "~hardware"]))
    assert alone.pop("trainer") != default.pop("trainer") or option == "cpu"
    assert alone == default


@pytest.mark.parametrize("option", sorted(TRAINERS))
def test_trainer_options_build_their_trainer(option, shrunk, tmp_path, torch_flags):
    accelerator, _, precision, strategy, _, _ = TRAINERS[option]
    node = shrunk([f"trainer={option}"]).trainer
    assert (node.accelerator, node.devices, node.precision, node.get("strategy"), node.deterministic,
            node.benchmark) == TRAINERS[option]
    assert node.default_root_dir == str(tmp_path) and node.max_epochs == 1
    # a GPU option on this CPU: its own settings but for the device (two processes for DDP)
    on_cpu = ["trainer.accelerator=cpu", f"trainer.devices={2 if strategy else 1}"] if accelerator == "gpu" else []
    trainer = build_trainer(shrunk([f"trainer={option}", *on_cpu]))
    assert trainer.precision == precision and trainer.max_epochs == 1 and trainer.default_root_dir == str(tmp_path)
    assert isinstance(trainer.strategy, DDPStrategy if strategy else SingleDeviceStrategy)
    assert trainer.num_devices == (2 if strategy else 1)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_cpu_trainers_keep_the_data_and_model_defaults():
    for option in ("cpu", "ddp_cpu"):
        cfg = raw([f"trainer={option}"])
        assert not (cfg.data.pin_memory or cfg.data.device_flips or cfg.model.channels_last or cfg.model.compile)
        assert [a._target_ for a in cfg.data.augment] == ["albumentations.SquareSymmetry"]


@pytest.mark.parametrize("option", sorted(CASES["hardware"]))
def test_gpu_trainers_bring_their_data_and_model_settings(option, shrunk):
    cfg = raw([f"trainer={option}"])
    assert (cfg.data.pin_memory, cfg.data.num_workers, cfg.data.persistent_workers, cfg.data.device_flips,
            list(cfg.data.augment)) == (True, 8, True, True, [])
    assert cfg.model.channels_last is True and cfg.model.compile is True
    # experiments and the command line still win over them
    cfg = raw([f"trainer={option}", "experiment=eurosat_resnet18", "data.pin_memory=false", "model.compile=false"])
    assert (cfg.data.batch_size, cfg.data.pin_memory, cfg.model.compile, cfg.data.device_flips) == (128, False, False, True)
    # the same settings built on the CPU: the loaders they give (no worker is started) and the model
    cfg = shrunk([f"hardware={option}", "data.num_workers=2"])
    assert cfg.trainer.accelerator == "cpu"
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (2, True, True)
    assert datamodule.device_flips is True
    model = build_model(cfg.model, cfg.loss, datamodule)
    assert model.channels_last is True and model.compile_options == {}  # compiled with torch's defaults


def test_eval_takes_the_gpu_settings_with_its_trainer():
    cfg = raw(["trainer=gpu", "ckpt_path=x.ckpt"], config="eval")
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.data.pin_memory, cfg.data.num_workers) == (
        "gpu", "bf16-mixed", True, 8)
    assert raw(["ckpt_path=x.ckpt"], config="eval").data.pin_memory is False


# ---- callbacks and loggers --------------------------------------------------------------------
def test_default_callbacks(shrunk, tmp_path, torch_flags):
    cfg = shrunk(["callbacks=default"])
    best, last, lr, distribution = instantiate_group(cfg.callbacks)
    assert isinstance(best, ModelCheckpoint) and isinstance(last, ModelCheckpoint)
    assert best.dirpath == last.dirpath == str(tmp_path / "checkpoints")
    assert (best.monitor, best.mode, best.save_top_k, best.save_last) == ("val/loss", "min", 1, True)
    assert (last.save_top_k, last.save_last, last._every_n_train_steps) == (0, True, 100)
    assert isinstance(lr, LearningRateMonitor) and lr.logging_interval == "epoch"
    assert class_name(distribution) == "ClassDistribution"
    trainer = build_trainer(cfg)
    assert [c.dirpath for c in trainer.checkpoint_callbacks] == [str(tmp_path / "checkpoints")] * 2


def test_no_callbacks(shrunk):
    assert instantiate_group(shrunk(["callbacks=none"]).callbacks) == []


@pytest.mark.parametrize("option, kinds", [("csv", [CSVLogger]), ("tensorboard", [TensorBoardLogger]),
                                           ("many", [CSVLogger, TensorBoardLogger])])
def test_loggers(option, kinds, shrunk, tmp_path, torch_flags):
    trainer = build_trainer(shrunk([f"logger={option}"]))
    assert [type(logger) for logger in trainer.loggers] == kinds
    # in the run directory, one folder each and no version_N below it
    folders = {CSVLogger: tmp_path / "csv", TensorBoardLogger: tmp_path / "tensorboard"}
    assert [Path(logger.log_dir) for logger in trainer.loggers] == [folders[kind] for kind in kinds]


# ---- data -------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["folder", "bigearthnet", "manifest", "pairs"])
def test_data_options_build_their_datamodule(option, shrunk, tmp_path, pairs_root):
    overrides = {
        "folder": [],
        "bigearthnet": ["data=bigearthnet", f"data.root={BIGEARTHNET}"],
        "manifest": ["data=manifest", f"data.root={SAMPLE}", f"data.layout.manifest={sample_manifest(tmp_path)}"],
        "pairs": ["data=pairs", f"data.root={pairs_root}", f"data.layout.band_names=[{','.join(PAIR_BANDS)}]"],
    }[option]
    cfg = shrunk(overrides)
    assert set(OmegaConf.load(CONF / "data" / "base.yaml")) <= set(cfg.data)  # every option carries the shared settings
    assert cfg.data.seed == cfg.seed and cfg.data.cache_dir == cfg.paths.cache_dir
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    spec = datamodule.input_spec
    layout, task, tile, bands = {
        "folder": ("FolderLayout", "multiclass", [64, 64], EUROSAT_BANDS),
        "bigearthnet": ("BigEarthNetLayout", "multilabel", [120, 120], None),
        "manifest": ("ManifestLayout", "multilabel", [64, 64], None),
        "pairs": ("PairLayout", "multiclass", [32, 32], [f"{b}@t{d}" for d in (0, 1) for b in PAIR_BANDS]),
    }[option]
    assert class_name(datamodule.layout) == layout and isinstance(datamodule.layout, get_class(cfg.data.layout._target_))
    assert (spec.task, list(spec.tile_size)) == (task, tile)
    assert len(datamodule.datasets["train"]) > 0 and len(datamodule.datasets["val"]) > 0
    if bands is not None:
        assert spec.band_names == bands
    if option == "bigearthnet":
        assert len(spec.bands) == 12 and 0 < len(spec.class_names) <= 43
    if option == "manifest":
        assert "water" in spec.class_names and len(spec.class_names) == 11 and len(spec.bands) == 13
    if option == "pairs":
        assert spec.class_names == ["loss", "stable"]


# ---- models and loss --------------------------------------------------------------------------
#: backbone option: network class (torchvision's, timm's; None: deforest's own), input channels
#: of its first convolution (the sample's 13 bands)
MODELS = {
    "small_cnn": (None, 10),  # B01, B09, B10 kept out of the CNN
    "resnet18": ("ResNet", 13),
    "resnet50": ("ResNet", 13),
    "efficientnet_b0": ("EfficientNet", 13),
    "vit_small": ("VisionTransformer", 13),
}


#: residual blocks in the first stage: which ResNet was built
RESNET_BLOCKS = {"resnet18": 2, "resnet50": 3}


@pytest.mark.parametrize("option", sorted(MODELS))
def test_model_options_build_a_classifier_that_runs(option, shrunk):
    cfg = shrunk([f"model={option}"])
    assert set(OmegaConf.load(CONF / "model" / "base.yaml")) <= set(cfg.model)
    assert cfg.model.scheduler.max_lr == cfg.model.optimizer.lr
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    model = build_model(cfg.model, cfg.loss, datamodule, cfg.tune_thresholds)
    network, channels = MODELS[option]
    assert network is None or class_name(model.net) == network
    stem = first_conv(model.net)
    assert stem.in_channels == channels and (option != "small_cnn" or stem.out_channels == cfg.model.width == 8)
    spec = model.input_spec
    assert len(spec.network.bands or spec.bands) == channels and spec.network.pool == cfg.model.get("input_pool", 1)
    if option.startswith("resnet"):  # the configured depth and stride-2 stem (small_tile_stem: false)
        assert len(model.net.layer1) == RESNET_BLOCKS[option] and model.net.conv1.in_channels == 13
        assert model.net.conv1.stride == (2, 2)
    model.eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 13, 64, 64) * 3000)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_default_loss(shrunk):
    cfg = shrunk(["loss=default"])
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    criterion = build_model(cfg.model, cfg.loss, datamodule).criterion
    assert isinstance(criterion, DynamicWeightedLoss)
    # auto: inverse_count for the sample's multi-class head
    assert (criterion.task, criterion.num_classes, criterion.scheme, criterion.normalize) == (
        "multiclass", 10, "inverse_count", "mean")
    assert raw().loss.multilabel_scheme == "tolerant" and raw().loss.label_smoothing == 0.1 and raw().loss.negative_scale is None
    assert raw().data.sampler == "auto"


# ---- experiments ------------------------------------------------------------------------------
def test_experiments_compose_with_their_settings(monkeypatch):
    for name in ("BIGEARTHNET_ROOT", "BIGEARTHNET_SPLITS", "EUROSAT_ROOT", "EUROSAT_SPLITS", "DEFOREST_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    got = {}
    for name in sorted(CASES["experiment"]):
        cfg = raw([f"experiment={name}"], hydra=True)
        choices = cfg.hydra.runtime.choices
        got[name] = (choices.data, choices.model, cfg.data.batch_size, cfg.trainer.max_epochs)
    assert got == {
        "bigearthnet19_benchmark": ("bigearthnet", "resnet50", 64, 30),
        "bigearthnet_resnet50": ("bigearthnet", "resnet50", 64, 30),
        "eurosat_benchmark": ("folder", "resnet50", 64, 30),
        "eurosat_resnet18": ("folder", "resnet18", 128, 40),
        "forest_loss": ("pairs", "small_cnn", 16, 60),
        "imbalance": ("folder", "small_cnn", 32, 15),
        "imbalance_multilabel": ("manifest", "small_cnn", 32, 25),
    }
    benchmark = raw(["experiment=bigearthnet19_benchmark"])
    assert benchmark.data.root == str(BIGEARTHNET)  # the shipped patches unless BIGEARTHNET_ROOT says otherwise
    assert (benchmark.data.layout.nomenclature, benchmark.model.weights, benchmark.model.input_resize) == (
        19, "ResNet50_Weights.SENTINEL2_ALL_MOCO", 224)
    assert benchmark.data.layout.split_csvs.test == f"{BIGEARTHNET}/test.csv"
    assert raw(["experiment=eurosat_benchmark"]).data.split_files.val == f"{SAMPLE}/eurosat-val.txt"
    assert OmegaConf.is_missing(raw(["experiment=forest_loss"]).data, "root")
    monkeypatch.setenv("BIGEARTHNET_SPLITS", "/lists")
    assert raw(["experiment=bigearthnet19_benchmark"]).data.layout.exclude_csvs[1] == "/lists/patches_with_seasonal_snow.csv"


#: experiment: the overrides that point it at the shipped data (and leave out downloads)
def _experiment_data(name: str, tmp_path: Path, pairs_root: Path, monkeypatch) -> list[str]:
    if name == "eurosat_benchmark":
        split_lists(tmp_path / "lists", [f"{p.stem}.jpg" for p in sorted(SAMPLE.rglob("*.tif"))], "eurosat-{split}.txt")
        monkeypatch.setenv("EUROSAT_SPLITS", str(tmp_path / "lists"))
    if name == "bigearthnet19_benchmark":
        split_lists(tmp_path / "lists", sorted(p.name for p in BIGEARTHNET.iterdir() if p.is_dir()), "{split}.csv")
        (tmp_path / "lists" / "patches_with_cloud_and_shadow.csv").write_text("S2B_MSIL2A_20170906T101019_76_61\n")
        (tmp_path / "lists" / "patches_with_seasonal_snow.csv").write_text("")
        monkeypatch.setenv("BIGEARTHNET_SPLITS", str(tmp_path / "lists"))
    if name == "forest_loss":
        return [f"data.root={pairs_root}", f"data.layout.band_names=[{','.join(PAIR_BANDS)}]"]
    # the SSL4EO weights are a download: tests/models/test_weights.py loads them from a cached file
    return ["model.weights=null"] if name.endswith("benchmark") else []


#: experiment: task, backbone, tile size the network sees
EXPERIMENTS = {
    "eurosat_resnet18": ("multiclass", "resnet18", 64),
    "imbalance": ("multiclass", "small_cnn", 64),
    "forest_loss": ("multiclass", "small_cnn", 32),
    "eurosat_benchmark": ("multiclass", "resnet50", 224),
    "bigearthnet_resnet50": ("multilabel", "resnet50", 120),
    "bigearthnet19_benchmark": ("multilabel", "resnet50", 224),
    "imbalance_multilabel": ("multilabel", "small_cnn", 32),
}
#: writing the long-tailed mosaics takes about 15 s: longer than the fast suite allows
SLOW_EXPERIMENTS = {"imbalance_multilabel"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_EXPERIMENTS else n
                                  for n in EXPERIMENTS])
def test_experiments_build(name, shrunk, tmp_path, pairs_root, monkeypatch):
    overrides = _experiment_data(name, tmp_path, pairs_root, monkeypatch)
    cfg = shrunk([f"experiment={name}", *overrides])
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    model = build_model(cfg.model, cfg.loss, datamodule, cfg.tune_thresholds)
    task, backbone, size = EXPERIMENTS[name]
    spec = model.input_spec
    network = MODELS[backbone][0]
    assert spec.task == task and (network is None or class_name(model.net) == network)
    if backbone in RESNET_BLOCKS:
        assert len(model.net.layer1) == RESNET_BLOCKS[backbone]
    assert (cfg.model.input_resize or spec.tile_size[0]) == size
    if name == "imbalance":  # the long tail made in the training split: Forest keeps all, SeaLake about a third
        train = datamodule.datasets["train"]
        counts = {c: sum(1 for t in train.targets if spec.class_names[int(t)] == c) for c in ("Forest", "SeaLake")}
        assert counts["Forest"] > 2 * counts["SeaLake"] > 0
    if name == "bigearthnet19_benchmark":  # the patch on the cloud list is left out
        sources = [Path(s).name for d in datamodule.datasets.values() for s in d.sources]
        assert "S2B_MSIL2A_20170906T101019_76_61" not in sources and spec.split.kind
    if name.endswith("benchmark"):  # the pretrained backbone learns 10x slower than the head
        assert cfg.model.backbone_lr_multiplier == 0.1


# ---- debug, search, report, paths, hydra -----------------------------------------------------
def test_debug_options_build_their_trainer(shrunk, torch_flags):
    fdr = shrunk(["debug=fdr"])
    assert fdr.task_name == "debug" and build_trainer(fdr).fast_dev_run is True
    limit = raw(["debug=limit"])
    assert (limit.task_name, limit.trainer.max_epochs) == ("debug", 3)
    trainer = build_trainer(shrunk(["debug=limit"]))
    assert (trainer.limit_train_batches, trainer.limit_val_batches, trainer.limit_test_batches) == (3, 2, 2)
    overfit = shrunk(["debug=overfit"])
    assert (overfit.task_name, overfit.test, list(overfit.data.augment)) == ("debug", False, [])
    assert build_trainer(overfit).overfit_batches == 2 and raw(["debug=overfit"]).trainer.max_epochs == 30
    profiler = shrunk(["debug=profiler"])
    assert profiler.task_name == "debug" and isinstance(build_trainer(profiler).profiler, SimpleProfiler)



def test_debug_runs_land_in_logs_debug(monkeypatch):
    monkeypatch.delenv("DEFOREST_LOG_DIR", raising=False)
    for option in sorted(CASES["debug"]):
        cfg = raw([f"debug={option}"], hydra=True)
        assert cfg.task_name == "debug" and cfg.hydra.run.dir.startswith("./logs/debug/runs/")


def test_optuna_search():
    optuna = pytest.importorskip("optuna")
    cfg = raw(["hparams_search=optuna"], hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
    assert (sweeper.direction, sweeper.n_trials, sweeper.study_name) == ("maximize", 20, "train")
    assert cfg.optimized_metric == "val/f1_macro"  # what train returns to the sweeper
    sampler = instantiate(sweeper.sampler)
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._n_startup_trials == 8
    assert set(sweeper.params) == {"model.optimizer.lr", "model.optimizer.weight_decay", "loss.scheme", "model"}
    assert sweeper.storage.startswith("sqlite:///") and sweeper.storage.endswith("/optuna.db")


def test_report_and_paths(shrunk, tmp_path, monkeypatch):
    cfg = shrunk()
    assert (cfg.report.enabled, cfg.report.examples, cfg.report.rgb_bands) == (True, 18, None)
    assert cfg.paths.data_dir == str(DATA) and cfg.data.root == str(SAMPLE)
    assert cfg.paths.output_dir == str(tmp_path) and cfg.paths.log_dir == str(tmp_path / "logs")
    monkeypatch.setenv("DEFOREST_LOG_DIR", "/runs")
    monkeypatch.setenv("DEFOREST_DATA_DIR", "/tiles")
    paths = raw().paths
    assert (paths.log_dir, paths.data_dir, raw().data.root) == ("/runs", "/tiles", "/tiles/eurosat-ms")


def test_hydra_settings_and_callbacks(monkeypatch):
    monkeypatch.delenv("DEFOREST_LOG_DIR", raising=False)
    cfg = raw([], hydra=True)
    assert cfg.hydra.run.dir.startswith("./logs/train/runs/") and cfg.hydra.sweep.dir.startswith("./logs/train/multiruns/")
    assert cfg.hydra.job.chdir is False
    callbacks = {name: class_name(instantiate(node)) for name, node in cfg.hydra.callbacks.items()}
    assert callbacks == {"run_lock": "RunDirLockCallback", "sweep_summary": "SweepSummary",
                         "share_cores": "ShareCoresBetweenJobs"}


def test_hydra_launchers_compose():
    local = raw(["hydra/launcher=submitit_local"], hydra=True).hydra
    assert local.launcher._target_.endswith("submitit_launcher.LocalLauncher") and local.launcher.gpus_per_node == 1
    slurm = raw(["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=gpu"],
                hydra=True).hydra
    launcher = slurm.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher") and launcher.partition == "gpu"
    assert (launcher.tasks_per_node, launcher.signal_delay_s) == (4, 120)  # one process per GPU
    assert plain(launcher)["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"


# ---- the other commands' configs --------------------------------------------------------------
#: config: what must be given on the command line
REQUIRED = {
    "train": set(),
    "eval": {"ckpt_path"},
    "predict": {"ckpt_path", "out"},
    "tile": {"scene", "out"},
    "pack": {"out"},
    "area": {"map"},
    "compare": {"dirs"},
    "export": {"ckpt_path"},
}


@pytest.mark.parametrize("config", sorted(REQUIRED))
def test_command_configs_compose(config, monkeypatch):
    monkeypatch.delenv("DEFOREST_LOG_DIR", raising=False)
    monkeypatch.delenv("DEFOREST_DATA_DIR", raising=False)
    cfg = raw([], config=config)
    assert cfg.task_name == config and cfg.paths.data_dir == str(DATA)
    assert set(missing_keys(plain(cfg))) == REQUIRED[config]
    assert raw([], config=config, hydra=True).hydra.run.dir.startswith(f"./logs/{config}/runs/")


@pytest.mark.parametrize("group,key,hint", [
    ("data", "batch_sise", "did you mean data.batch_size?"),
    ("model", "widht", "did you mean model.width?"),
    ("loss", "label_smoothin", "did you mean loss.label_smoothing?"),
    ("data", "zzz", "the data settings are in conf/data/"),
])
def test_a_key_no_group_setting_has_is_one_config_error(group, key, hint, tmp_path):
    """``+data.batch_sise=8`` adds a key Hydra cannot refuse (the ``+`` says "new key"): the
    builders refuse it by name, as a ConfigError (one line, exit status 2), not a TypeError
    traceback from a constructor."""
    from deforest.core.errors import ConfigError

    cfg = compose_train_config(tmp_path, [f"+{group}.{key}=1"])
    datamodule = None if group == "data" else build_datamodule(cfg.data)
    with pytest.raises(ConfigError) as raised:
        if group == "data":
            build_datamodule(cfg.data)
        else:
            datamodule.setup("fit")
            build_model(cfg.model, cfg.loss, datamodule)
    assert str(raised.value) == f"invalid config: {group}.{key} is not a {group} setting ({hint})"
