"""Backbones adapted to N input bands and small tiles.

torchvision's ImageNet networks expect 3 bands and 224 px images: their stem (a stride-2
7x7 convolution and a max-pool) shrinks a 64 px tile to 16 px before the first block. The
``small_tile_stem`` option swaps it for a stride-1 3x3 convolution and keeps the max-pool,
which keeps four times as many positions at modest cost.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

BACKBONES = ("small_cnn", "resnet18", "resnet34", "resnet50", "efficientnet_b0")
#: Any other ``model.backbone`` is a timm model name (``timm.list_models()``), e.g. the
#: ``vit_small_patch16_224`` of TorchGeo's SSL4EO-S12 ViT weights.


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Four VGG-style blocks with batch norm and global average pooling: fast on a CPU."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.2) -> None:
        super().__init__()
        widths = [width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(widths):
            layers.append(_conv_block(c_in, c_out))
            if i < len(widths) - 1:
                # ceil_mode: a 1 px map stays 1 px instead of 0, so tiles down to 1 px (8 px
                # Landsat patches, pooled by model.input_pool) pass; even sizes pool as before
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BandStatistics(nn.Module):
    """A linear classifier on per-band summary statistics: the spectral baseline beside the CNN.

    Per band: mean, standard deviation, the 10th/50th/90th percentiles (of about 256 pixels
    on a regular grid) and the mean absolute difference between pixels 1, 2 and 4 px apart
    along each axis (texture at three scales).
    A linear model on such statistics is the classic land-cover baseline; trained from a few
    hundred tiles it errs on other tiles than a CNN does, so averaging the two heads' logits
    (an ensemble of two different learners) corrects part of each one's mistakes.

    The linear weights start at zero and are scaled by ``gain`` in the forward pass, so an
    adaptive optimiser (Adam) moves this convex head ``gain`` times faster than the CNN at the
    same learning rate: it converges within the CNN's schedule.
    """

    QUANTILES = (0.1, 0.5, 0.9)
    PERCENTILE_PIXELS = 256
    OFFSETS = (1, 2, 4)

    def __init__(self, in_channels: int, num_classes: int, gain: float = 30.0) -> None:
        super().__init__()
        features = in_channels * (2 + len(self.QUANTILES) + 2 * len(self.OFFSETS))
        self.norm = nn.BatchNorm1d(features, affine=False)
        self.linear = nn.Linear(features, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.gain = gain

    @classmethod
    def features(cls, x: torch.Tensor) -> torch.Tensor:
        """``[N, C * 11]`` statistics of normalised tiles ``[N, C, H, W]``."""
        values = x.flatten(2)
        # Python ints: tracing (TorchScript, ONNX) hands out sizes as tensors, which round()
        # refuses; the tile size is fixed per model, so constants in the graph are right
        height, width = int(x.shape[2]), int(x.shape[3])
        # percentiles from a regular grid of about 256 pixels: sorting every pixel of a 64 px
        # tile cost as much as the CNN's training step; sort rather than torch.quantile,
        # which refuses inputs over 16M values (large batches)
        step = max(1, round((height * width / cls.PERCENTILE_PIXELS) ** 0.5))
        ordered = x[:, :, ::step, ::step].flatten(2).sort(dim=2).values
        last = int(ordered.shape[2]) - 1
        mean = values.mean(dim=2)
        # E[x^2] - E[x]^2: ten times faster than Tensor.std here, exact enough for normalised inputs
        std = (values.square().mean(dim=2) - mean.square()).clamp(min=0).sqrt()
        stats = [mean, std, *(ordered[:, :, round(q * last)] for q in cls.QUANTILES)]
        for offset in cls.OFFSETS:
            dy, dx = min(offset, height - 1), min(offset, width - 1)
            stats.append((x[:, :, dy:] - x[:, :, : height - dy]).abs().mean(dim=(2, 3)))
            stats.append((x[:, :, :, dx:] - x[:, :, :, : width - dx]).abs().mean(dim=(2, 3)))
        return torch.cat(stats, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * self.linear(self.norm(self.features(x)))


def build_backbone(
    name: str,
    in_channels: int,
    num_classes: int,
    small_tile_stem: bool = False,
    width: int = 32,
    dropout: float = 0.2,
    input_pool: int = 1,
    image_size: tuple[int, int] | None = None,
) -> nn.Module:
    """A classifier taking ``[N, in_channels, H, W]`` and returning ``[N, num_classes]`` logits.

    Weights start random; :func:`deforest.models.weights.load_pretrained` loads pretrained ones.
    ``input_pool`` > 1 average-pools the tile by that factor before the network.
    ``image_size`` (the pooled tile) sizes timm networks that need it (ViT, Swin).
    """
    if input_pool < 1:
        raise ValueError(f"input_pool must be >= 1, not {input_pool}")
    if name not in BACKBONES:
        return _timm_network(name, in_channels, num_classes, dropout, image_size, input_pool)
    net = _network(name, in_channels, num_classes, small_tile_stem, width, dropout)
    return nn.Sequential(nn.AvgPool2d(input_pool), net) if input_pool > 1 else net


#: ``model.fusion``: how the two dates of a pair meet. ``early``: their bands stacked as one
#: image for one network; ``siamese``: one backbone run on each date (:class:`SiameseNetwork`)
FUSIONS = ("early", "siamese")


class SiameseNetwork(nn.Module):
    """One backbone shared by the dates of a sample; its pooled features of each date and their
    absolute difference, ``[f0, f1, |f0 - f1|]``, go into one linear classifier.

    ``date_bands``: per date, the positions of its bands in the input, in the same band order
    for every date (:func:`deforest.data.pairs.date_band_positions`). ``encoder``: a
    :func:`build_backbone` network whose classifier was removed (:func:`strip_classifier`),
    returning ``features`` values per image.

    Why these features: the difference carries the change and is the same whichever date
    shows what (as in the FC-Siam-diff change-detection networks), but alone it cannot tell
    loss from regrowth, which differ only in direction; the features of each date say what
    the land was before and after, so the classifier sees both the change and its direction
    (FC-Siam-conc concatenates the dates' features for that reason).
    """

    def __init__(self, encoder: nn.Module, features: int, num_classes: int, date_bands: list[list[int]]) -> None:
        super().__init__()
        if len(date_bands) != 2 or len({len(b) for b in date_bands}) != 1 or not date_bands[0]:
            raise ValueError(f"a siamese network takes two dates of as many bands each, not {date_bands}")
        self.encoder = encoder
        self.features = features
        self.classifier = nn.Linear(3 * features, num_classes)  # f0, f1 and |f0 - f1|
        # a buffer, so the dates are taken apart on the device without a host copy per step;
        # not saved: it follows from the contract's band names, which the checkpoint keeps
        self.register_buffer("date_bands", torch.as_tensor(date_bands, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # both dates in one batch through the encoder: one pass, and its batch norm normalises
        # both dates with the same statistics, so a change between the dates is not normalised away
        # (stack and reshape, not cat and chunk: chunk's size guard fixes the batch size of an exported graph)
        dates = torch.stack([x.index_select(1, self.date_bands[0]), x.index_select(1, self.date_bands[1])]).flatten(0, 1)
        before, after = self.encoder(dates).reshape(2, x.shape[0], -1).unbind(0)
        return self.classifier(torch.cat([before, after, (before - after).abs()], dim=1))


def strip_classifier(net: nn.Module) -> int:
    """Replace the last linear layer of a :func:`build_backbone` network's classifier head by
    an identity, in place, so the network returns its pooled features; returns their count."""
    inner = net[1] if isinstance(net, nn.Sequential) and isinstance(net[0], nn.AvgPool2d) else net
    attribute = next(name for name in ("fc", "classifier", "head") if hasattr(inner, name))
    head = getattr(inner, attribute)
    if isinstance(head, nn.Linear):
        setattr(inner, attribute, nn.Identity())
        return head.in_features
    name, linear = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)][-1]
    parent, _, child = name.rpartition(".")
    setattr(head.get_submodule(parent) if parent else head, child, nn.Identity())
    return linear.in_features


def build_siamese(name: str, date_bands: list[list[int]], num_classes: int, *options: Any) -> SiameseNetwork:
    """A :class:`SiameseNetwork` whose shared backbone is :func:`build_backbone` ``(name, ...)``
    for one date's bands; ``options`` are :func:`build_backbone`'s after ``num_classes``
    (``small_tile_stem``, ``width``, ``dropout``, ``input_pool``, ``image_size``)."""
    encoder = build_backbone(name, len(date_bands[0]), num_classes, *options)
    return SiameseNetwork(encoder, strip_classifier(encoder), num_classes, date_bands)


def smallest_tile(
    name: str, in_channels: int, size: tuple[int, int], input_pool: int = 1, **options: object
) -> int | None:
    """``None`` when :func:`build_backbone` ``(name, ...)`` takes ``size`` (height, width) px
    inputs; else the smallest square side it takes, found by a forward pass of one zero tile
    at each power of two (a ViT's patch is its smallest input). Checked before training:
    a network that cannot take the tiles otherwise fails in the first step."""

    def takes(height: int, width: int) -> bool:
        if min(height, width) < input_pool:
            return False
        image = (height // input_pool, width // input_pool)
        try:
            net = build_backbone(name, in_channels, 2, input_pool=input_pool, image_size=image, **options).eval()
            with torch.no_grad():
                net(torch.zeros(1, in_channels, height, width))
        except (RuntimeError, ValueError, AssertionError):  # torch's "Output size is too small", timm's checks
            return False
        return True

    if takes(*size):
        return None
    side = 2
    while side <= 4096 and not takes(side, side):
        side *= 2
    return side


def backbone_names() -> tuple[str, ...]:
    """Every valid ``model.backbone``: this project's networks, then timm's models when timm is installed."""
    try:
        import timm
    except ImportError:
        return tuple(BACKBONES)
    return (*BACKBONES, *timm.list_models())


def _timm_network(
    name: str, in_channels: int, num_classes: int, dropout: float, image_size: tuple[int, int] | None, input_pool: int
) -> nn.Module:
    """A timm model for the band count; transformers are built for the tile size."""
    try:
        import timm
    except ImportError:
        raise ValueError(f"unknown backbone {name!r}; choose from {BACKBONES}, or pip install 'deforest[weights]' for timm models") from None
    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}; choose from {BACKBONES} or a timm model name (timm.list_models())")
    options = {"in_chans": in_channels, "num_classes": num_classes, "drop_rate": dropout}
    try:  # ViT/Swin take the image size; CNNs do not accept the argument
        net = timm.create_model(name, img_size=image_size, **options) if image_size else timm.create_model(name, **options)
    except TypeError:
        net = timm.create_model(name, **options)
    return nn.Sequential(nn.AvgPool2d(input_pool), net) if input_pool > 1 else net


def backbone_modules(net: nn.Module) -> nn.ModuleList:
    """Every top-level part of a :func:`build_backbone` network but its classifier head.

    What fine-tuning freezes (``BackboneFinetuning``, ``model.freeze_backbone``) and what
    ``model.backbone_lr_multiplier`` applies to; a fresh list each call, so the parts
    are not registered twice in the module's state dict.
    """
    if isinstance(net, SiameseNetwork):  # the shared encoder; its classifier is the head
        net = net.encoder
    inner = net[1] if isinstance(net, nn.Sequential) and isinstance(net[0], nn.AvgPool2d) else net
    head = next(getattr(inner, name) for name in ("fc", "classifier", "head") if hasattr(inner, name))
    return nn.ModuleList(child for child in inner.children() if child is not head)


def _network(
    name: str, in_channels: int, num_classes: int, small_tile_stem: bool, width: int, dropout: float
) -> nn.Module:
    if name == "small_cnn":
        return SmallCNN(in_channels, num_classes, width=width, dropout=dropout)
    if name in ("resnet18", "resnet34", "resnet50"):
        net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        if small_tile_stem:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        else:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        if dropout:
            net.fc = nn.Sequential(nn.Dropout(dropout), net.fc)
        return net
    if name == "efficientnet_b0":
        net = torchvision.models.efficientnet_b0(weights=None, num_classes=num_classes)
        stem = net.features[0][0]
        net.features[0][0] = nn.Conv2d(
            in_channels, stem.out_channels, 3, stride=1 if small_tile_stem else 2, padding=1, bias=False
        )
        return net
    raise ValueError(f"unknown backbone {name!r}; choose from {BACKBONES}")
