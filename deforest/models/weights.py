"""Pretrained weights: where they come from, which bands they expect, how inputs are scaled.

``model.weights`` names them: ``imagenet`` (torchvision's own weights for the backbone), a
TorchGeo weight name such as ``ResNet50_Weights.SENTINEL2_ALL_MOCO`` (its weights API, in
the optional ``deforest[weights]`` extra), or a local file. Downloads go through torch
hub's cache (``$TORCH_HOME/hub/checkpoints``), so a file copied there is used offline.

Three pieces of plain data come out of here and travel in the checkpoint's hyperparameters:

* :class:`InputNormalization`: the scaling the network's inputs need (the weights' own,
  e.g. SSL4EO's divide-by-10,000, or this data's log1p statistics for random/ImageNet
  starts), applied by :class:`deforest.data.transforms.BandNormalizer` in the module;
* the band plan (:func:`band_plan`): which pretrained first-layer kernel each data band gets;
* the weights' name.

Every file is read with ``weights_only=True``: a weights file never runs code.
"""

from __future__ import annotations

import logging
import urllib.error
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from deforest.core.bands import canonical_band
from deforest.core.contract import InputSpec
from deforest.models.networks import BACKBONES

log = logging.getLogger(__name__)

#: What ImageNet's three input channels are in Sentinel-2 terms (red, green, blue);
#: ``model.weights_bands`` overrides it for other sensors.
IMAGENET_BANDS = ["B04", "B03", "B02"]

#: Per network family: the first convolution's weight and the classifier's key prefix
#: (``timm``: the transformers, ViT and Swin, whose patch embedding is the first layer).
_STEM = {
    "resnet": "conv1.weight", "efficientnet": "features.0.0.weight", "small_cnn": "features.0.0.weight",
    "timm": "patch_embed.proj.weight",
}
_HEAD = {"resnet": "fc.", "efficientnet": "classifier.", "small_cnn": "head.", "timm": "head."}
#: Where a checkpoint may keep the network's keys (deforest: ``net.``, ``net.1.`` behind input pooling).
_PREFIXES = ("", "net.", "net.1.", "module.", "model.", "backbone.", "encoder.", "state_dict.")


class WeightsError(ValueError):
    """Weights that cannot be found, read or fitted to this network and data."""


@dataclass(frozen=True)
class InputNormalization:
    """``(f(x) - mean) / std`` per loaded band, ``f = log1p`` when ``log_scale``.

    What the network's inputs must look like; ``source`` says where it came from
    (``data statistics`` or the weights' name). Plain data, so it can sit in a checkpoint.
    """

    mean: list[float]
    std: list[float]
    log_scale: bool
    source: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PretrainedWeights:
    """A resolved ``model.weights``: the network's state dict and what its inputs were.

    ``bands``: the weights' input bands in order (``None``: unknown). ``mean``/``std``: the
    raw-unit input scaling they were trained with, one value or one per band (``None``:
    unknown, this data's statistics are used); ``log_scale`` applies before it.
    """

    name: str
    state_dict: dict[str, Tensor]
    in_channels: int
    bands: list[str] | None
    mean: list[float] | None = None
    std: list[float] | None = None
    log_scale: bool = False


def family(backbone: str) -> str:
    """``resnet``, ``efficientnet``, ``small_cnn`` (this project's networks) or ``timm``: the key layout."""
    if backbone not in BACKBONES:
        return "timm"
    return next(name for name in ("resnet", "efficientnet", "small_cnn") if backbone.startswith(name))


def resolve_weights(
    spec: str | None,
    backbone: str,
    bands: Sequence[str] | None = None,
    normalization: Mapping[str, Any] | None = None,
) -> PretrainedWeights | None:
    """The weights ``model.weights=spec`` names, or ``None`` for a random start.

    ``bands`` and ``normalization`` (``model.weights_bands``, ``model.weights_normalization``)
    describe a file's inputs and override what a named weight says about its own.
    """
    if spec is None:
        return None
    spec = str(spec)
    if spec == "imagenet":
        weights = _torchvision(backbone)
    elif "_Weights." in spec and not Path(spec).expanduser().exists():
        weights = _torchgeo(spec, backbone)
    else:
        weights = _file(Path(spec).expanduser(), backbone)
    if bands is not None:
        weights.bands = list(bands)
    if normalization:
        weights.mean, weights.std = _as_list(normalization.get("mean", 0.0)), _as_list(normalization.get("std", 1.0))
        weights.log_scale = bool(normalization.get("log_scale", False))
    if weights.bands is not None and len(weights.bands) != weights.in_channels:
        raise WeightsError(
            f"model.weights={spec}: the first convolution takes {weights.in_channels} bands, "
            f"the band list has {len(weights.bands)}: {weights.bands}"
        )
    return weights


def _as_list(value: float | Sequence[float]) -> list[float]:
    return [float(v) for v in value] if isinstance(value, Sequence) else [float(value)]


def _download(weights: Any, name: str) -> dict[str, Tensor]:
    """``weights.get_state_dict`` through torch hub's cache, never unpickling code."""
    try:
        return weights.get_state_dict(progress=False, weights_only=True, map_location="cpu")
    except (urllib.error.URLError, OSError) as err:
        target = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
        raise WeightsError(
            f"model.weights={name}: cannot download {weights.url} ({err}); without network, "
            f"copy that file to {target}"
        ) from None


def _torchvision(backbone: str) -> PretrainedWeights:
    if family(backbone) in ("small_cnn", "timm"):
        raise WeightsError("model.weights=imagenet needs a torchvision backbone (resnet18, resnet50, efficientnet_b0)")
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    state = _download(weights, "imagenet")
    return PretrainedWeights(f"imagenet ({weights})", state, _stem_channels(state, backbone), list(IMAGENET_BANDS))


def _torchgeo(name: str, backbone: str) -> PretrainedWeights:
    try:
        from torchgeo.models import get_weight
    except ImportError:
        raise WeightsError(f"model.weights={name} is a TorchGeo weight: pip install 'deforest[weights]'") from None
    try:
        weights = get_weight(name)
    except ValueError:
        raise WeightsError(f"model.weights={name}: not a TorchGeo weight name (torchgeo.models.list_models())") from None
    model = weights.meta.get("model", "")
    if model != backbone:
        raise WeightsError(f"model.weights={name} is for a {model!r} network: use model={model} (not {backbone})")
    state = _download(weights, name)
    mean, std = transforms_normalization(weights.transforms)
    bands = weights.meta.get("bands")
    return PretrainedWeights(name, state, _stem_channels(state, backbone), list(bands) if bands else None, mean, std)


def transforms_normalization(transforms: nn.Module | None) -> tuple[list[float] | None, list[float] | None]:
    """The net ``(x - mean) / std`` of the ``Normalize`` steps of a weights' transforms.

    Chained steps compose: ``((x - m1) / s1 - m2) / s2 = (x - (m1 + m2 s1)) / (s1 s2)``.
    Resizing and cropping steps are not applied: tiles keep their own size.
    """
    if transforms is None:
        return None, None
    kinds = (torchvision.transforms.v2.Normalize, torchvision.transforms.Normalize)
    steps = [m for m in transforms.modules() if isinstance(m, kinds)]
    if not steps:
        return None, None
    mean, std = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    for step in steps:
        m, s = torch.as_tensor(step.mean, dtype=torch.float64), torch.as_tensor(step.std, dtype=torch.float64)
        mean, std = mean + m * std, std * s
    return mean.tolist(), std.tolist()


def _file(path: Path, backbone: str) -> PretrainedWeights:
    """A state dict (``.pth``/``.pt``/``.safetensors``) or a timm/TorchGeo/Lightning/deforest checkpoint."""
    if not path.is_file():
        raise WeightsError(
            f"model.weights={path}: no such file, and not 'imagenet' or a TorchGeo weight name "
            f"(e.g. ResNet18_Weights.SENTINEL2_ALL_MOCO)"
        )
    try:
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise WeightsError(f"{path}: reading .safetensors needs pip install 'deforest[weights]'") from None
            content: Any = load_file(str(path), device="cpu")
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as err:  # pickle, zip and safetensors errors all mean "not a weights file"
        raise WeightsError(f"{path}: not a weights file ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if not isinstance(content, Mapping):
        raise WeightsError(f"{path}: holds a {type(content).__name__}, not a state dict")
    spec = content.get("input_spec") if isinstance(content.get("input_spec"), Mapping) else None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(content.get(key), Mapping):
            content = content[key]
            break
    state = _network_keys(dict(content), backbone, path)
    weights = PretrainedWeights(str(path), state, _stem_channels(state, backbone), None)
    if spec is not None:  # a deforest checkpoint: its contract says what its network saw
        _inputs_of_contract(weights, spec)
    return weights


def _inputs_of_contract(weights: PretrainedWeights, data: Mapping[str, Any]) -> None:
    """The network's band names and raw-unit input scaling from a deforest checkpoint's InputSpec."""
    try:  # read by the contract itself, so every layout it has had reads here too
        spec = InputSpec.from_dict(data)
    except (TypeError, ValueError, KeyError) as err:
        raise WeightsError(f"{weights.name}: its input_spec is not a deforest input contract ({err})") from None
    names, norm, positions = spec.band_names, spec.normalization, spec.network.bands
    if not names:
        return
    positions = list(range(len(names))) if positions is None else list(positions)
    weights.bands = [names[i] for i in positions]
    weights.log_scale = norm.transform == "log1p"
    scale = 1.0 if weights.log_scale else float(norm.scale)
    weights.mean, weights.std = [norm.mean[i] * scale for i in positions], [norm.std[i] * scale for i in positions]


def _network_keys(state: dict[str, Any], backbone: str, path: Path) -> dict[str, Tensor]:
    """The network's own keys: the first prefix under which the stem convolution is found."""
    stem = _STEM[family(backbone)]
    for prefix in _PREFIXES:
        if prefix + stem in state:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and isinstance(v, Tensor)}
    shown = ", ".join(list(state)[:4])
    raise WeightsError(f"{path}: no {stem} (the {backbone} stem) in its keys ({shown}, ...): weights for another network?")


def _stem_channels(state: Mapping[str, Tensor], backbone: str) -> int:
    return int(state[_STEM[family(backbone)]].shape[1])


def band_plan(weights: PretrainedWeights, data_bands: Sequence[str] | None, count: int) -> dict[str, Any]:
    """Which pretrained first-layer kernel each of the network's ``count`` data bands gets.

    Matched by name (:func:`canonical_band`); a data band the weights lack gets the mean of
    the pretrained kernels; weights bands the data lacks are dropped. Without names on one
    side, equal counts are taken in order (logged), anything else is an error.
    """
    wbands = weights.bands
    if wbands is None or data_bands is None:
        if count != weights.in_channels:
            missing = "model.weights_bands" if wbands is None else "the data's band names (data.layout.band_names)"
            raise WeightsError(
                f"model.weights={weights.name} takes {weights.in_channels} bands and the network {count}: "
                f"give {missing} so they can be matched by name"
            )
        log.warning("%s: no band names on one side; the %d bands are matched in order", weights.name, count)
        if wbands is None and data_bands is None:
            wbands = data_bands = [f"channel {i}" for i in range(count)]
        elif wbands is None:
            wbands = list(data_bands)
        else:
            data_bands = list(wbands)
    lookup = {canonical_band(b): i for i, b in enumerate(wbands)}
    source = [lookup.get(canonical_band(b)) for b in data_bands]
    if all(s is None for s in source):
        raise WeightsError(f"model.weights={weights.name}: none of the data's bands {list(data_bands)} is among its bands {wbands}")
    used = {s for s in source if s is not None}
    plan = {
        "weights": weights.name,
        "weights_bands": list(wbands),
        "network_bands": list(data_bands),
        "source": source,
        "new_bands": [b for b, s in zip(data_bands, source) if s is None],
        "dropped_bands": [b for i, b in enumerate(wbands) if i not in used],
    }
    log.info(
        "%s: first-layer kernels by band %s; new (mean of the pretrained kernels): %s; dropped: %s",
        weights.name,
        {b: wbands[s] for b, s in zip(data_bands, source) if s is not None},
        plan["new_bands"] or "none",
        plan["dropped_bands"] or "none",
    )
    return plan


def map_stem_kernels(kernel: Tensor, source: Sequence[int | None]) -> Tensor:
    """First-layer kernels ``[O, C_w, k, k]`` rearranged for the data's bands ``[O, C, k, k]``.

    A band the weights have keeps its own kernel, unscaled: those kernels were trained on
    that band's values, and scaling them (by 13/4 for 4 of 13 bands) would multiply the
    stem's response to exactly the inputs the weights know. A band the weights lack gets
    the mean of the pretrained kernels over their input bands, scaled by ``C_w / C`` as in
    timm's ``adapt_input_conv`` (which repeats kernels over new channels and rescales them),
    so the made-up kernels add a modest response instead of C_w-fold copies of one.
    """
    mean = kernel.mean(dim=1) * (kernel.shape[1] / len(source))
    columns = [kernel[:, s] if s is not None else mean for s in source]
    return torch.stack(columns, dim=1)


def input_normalization(
    weights: PretrainedWeights | None,
    bands: Sequence[str] | None,
    data_mean: Sequence[float],
    data_std: Sequence[float],
    log_scale: bool,
) -> InputNormalization:
    """The normalisation of the loaded ``bands``: the weights' own when they have one, else the data's.

    A band the weights have no statistics for gets the mean of theirs (logged).
    """
    if weights is None or weights.mean is None or weights.std is None:
        return InputNormalization(list(data_mean), list(data_std), log_scale, "data statistics")
    count = len(data_mean)
    if len(weights.mean) == 1 and len(weights.std) == 1:
        return InputNormalization(weights.mean * count, weights.std * count, weights.log_scale, weights.name)
    wbands = weights.bands or []
    if bands is None:
        if len(weights.mean) != count:
            raise WeightsError(f"{weights.name}: statistics for {len(weights.mean)} bands, the data has {count} unnamed ones")
        bands = wbands if len(wbands) == count else [str(i) for i in range(count)]
        wbands = bands
    lookup = {canonical_band(b): i for i, b in enumerate(wbands)}
    fallback = (sum(weights.mean) / len(weights.mean), sum(weights.std) / len(weights.std))
    mean, std, guessed = [], [], []
    for band in bands:
        i = lookup.get(canonical_band(band))
        mean.append(weights.mean[i] if i is not None else fallback[0])
        std.append(weights.std[i] if i is not None else fallback[1])
        if i is None:
            guessed.append(band)
    if guessed:
        log.warning("%s has no input statistics for %s: they get the mean of its statistics", weights.name, guessed)
    return InputNormalization(mean, std, weights.log_scale, weights.name)


def _resample_positions(pos_embed: Tensor, vit: nn.Module) -> Tensor:
    """A ViT's position embeddings interpolated to this tile's patch grid (timm's own resampling)."""
    from timm.layers import resample_abs_pos_embed

    prefix = getattr(vit, "num_prefix_tokens", 1)
    log.info("position embeddings resampled from %d to %d patches", pos_embed.shape[1] - prefix,
             vit.pos_embed.shape[1] - prefix)
    return resample_abs_pos_embed(pos_embed, list(vit.patch_embed.grid_size), num_prefix_tokens=prefix)


def load_pretrained(net: nn.Module, weights: PretrainedWeights, plan: Mapping[str, Any], backbone: str, small_tile_stem: bool) -> None:
    """Load ``weights`` into ``net`` (a :func:`deforest.models.networks.build_backbone` network).

    The classifier is dropped (its classes are not this data's); the stem keeps its
    pretrained kernels, band-mapped by ``plan``, unless its shape changed
    (``small_tile_stem``), which is then logged as dropped.
    """
    inner = net[1] if isinstance(net, nn.Sequential) and isinstance(net[0], nn.AvgPool2d) else net
    kind = family(backbone)
    stem_key, head = _STEM[kind], _HEAD[kind]
    state = {k: v for k, v in weights.state_dict.items() if not k.startswith(head)}
    state[stem_key] = map_stem_kernels(state[stem_key].float(), plan["source"])
    if kind == "timm" and "pos_embed" in state and state["pos_embed"].shape != inner.pos_embed.shape:
        state["pos_embed"] = _resample_positions(state["pos_embed"], inner)
    target = inner.state_dict()[stem_key]
    dropped_stem = state[stem_key].shape != target.shape
    if dropped_stem:
        pretrained = tuple(weights.state_dict[stem_key].shape)
        del state[stem_key]
        log.warning(
            "model.small_tile_stem=%s: the pretrained stem %s %s is dropped (its kernels do not fit the "
            "%s stem); it starts random", small_tile_stem, stem_key, pretrained, tuple(target.shape),
        )
    elif small_tile_stem and kind == "efficientnet":
        log.warning("model.small_tile_stem=true: the pretrained stem keeps its kernels but runs at stride 1")
    try:
        missing, unexpected = inner.load_state_dict(state, strict=False)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err).splitlines()[0])
        raise WeightsError(f"model.weights={weights.name} does not fit {backbone}: {detail}") from None
    missing = [k for k in missing if not k.startswith(head) and not k.endswith("num_batches_tracked")]
    if dropped_stem:
        missing = [k for k in missing if k != stem_key]
    if missing or unexpected:
        raise WeightsError(
            f"model.weights={weights.name} does not fit {backbone}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    log.info("started %s from %s", backbone, weights.name)
