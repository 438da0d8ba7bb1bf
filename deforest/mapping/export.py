"""A checkpoint as a self-contained network for runtimes without deforest: ONNX, TorchScript,
or a ``torch.export`` ExportedProgram.

The exported graph takes **raw** sensor values ``[N, C, H, W]`` (float32) of the contract's
bands in the contract's order, exactly as read from the files: it fills nodata and non-finite
pixels with each band's fill value and normalises inside the graph, as
:meth:`deforest.core.contract.InputSpec.prepare` and :meth:`TileClassifier.predict_proba` do, and
returns float32 probabilities ``[N, classes]`` (softmax for multi-class, sigmoid for
multi-label). The batch axis is dynamic; the tile size is the contract's.

The input contract travels with the graph, as JSON (:func:`export_metadata`): in the ONNX
file's ``metadata_props`` (key :data:`METADATA_KEY`), in the TorchScript and ExportedProgram
archives' extra files (:data:`METADATA_FILE`), and in a ``<out>.json`` file beside every format.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deforest.core.contract import InputSpec
from deforest.core.errors import ConfigError
from deforest.core.nodata import is_nodata
from deforest.core.outputs import check_outputs, check_replaceable
from deforest.core.vocabulary import MULTICLASS
from deforest.mapping.serve import METADATA_KEY
from deforest.training.module import TileClassifier

log = logging.getLogger(__name__)

#: format -> the suffix its file gets when ``out`` is not given
FORMATS = {"onnx": ".onnx", "torchscript": ".ts.pt", "exported_program": ".pt2"}
#: the ONNX ``metadata_props`` key holding the contract JSON
#: the name of the contract JSON inside TorchScript / ExportedProgram archives
METADATA_FILE = "deforest_export.json"
INPUT_NAME = "raw"
OUTPUT_NAME = "probabilities"
#: bumped when the meaning of the exported graph's input or output, or the layout of the contract
#: in its metadata, changes (2: the contract's source, network and calibration facts nested), so
#: an older reader refuses a newer file in one line
EXPORT_VERSION = 2
#: the ONNX opset written (torch's dynamo exporter targets 18 and up; onnxruntime >= 1.14 runs it)
ONNX_OPSET = 18


class RawInputClassifier(nn.Module):
    """Raw band values -> probabilities: the nodata fill of :meth:`InputSpec.prepare`, then
    :meth:`TileClassifier.predict_proba` (the model's own normalisation, heads, activation and,
    with ``tta``, the eight-view average).

    ``fill_nodata``: pixels equal to the contract's ``nodata`` (and NaN/inf pixels) take their
    band's fill value, the raw value that normalises to 0, as in training; ``False`` leaves it
    to the caller (:meth:`InputSpec.prepare`). ``model.tta`` is set to ``tta``.
    """

    def __init__(self, model: TileClassifier, fill_nodata: bool = True, tta: bool = False) -> None:
        super().__init__()
        spec = model.spec
        model.tta = tta
        self.model = model
        self.fill_nodata = fill_nodata
        # NaN nodata is caught by the finiteness test; a number needs its own comparison
        self.nodata = spec.nodata if spec.nodata is not None and not math.isnan(spec.nodata) else None
        self.register_buffer("fill", torch.tensor(spec.fill, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, raw: Tensor) -> Tensor:
        x = raw.to(torch.float32)
        if self.fill_nodata:
            valid = torch.isfinite(x)
            if self.nodata is not None:
                # the files' rule (validation.is_nodata): the value as float32, the pixels' dtype
                valid = valid & ~is_nodata(x, self.nodata)
            x = torch.where(valid, x, self.fill)
        return self.model.predict_proba(x).to(torch.float32)


@dataclass(frozen=True)
class ExportContract:
    """What a runtime needs to feed the exported graph and read its output."""

    input_spec: InputSpec
    format: str
    tta: bool
    fills_nodata: bool

    def to_dict(self) -> dict[str, Any]:
        spec = self.input_spec
        return {
            "export_version": EXPORT_VERSION,
            "format": self.format,
            "input": {
                "name": INPUT_NAME,
                "dtype": "float32",
                "shape": ["batch", len(spec.bands), *spec.tile_size],
                "values": "raw sensor values of input_spec.bands (1-based band indexes of the source files) in that order",
                "nodata_filled_in_graph": self.fills_nodata,
            },
            "output": {
                "name": OUTPUT_NAME,
                "dtype": "float32",
                "shape": ["batch", spec.num_classes],
                "activation": "softmax" if spec.task == MULTICLASS else "sigmoid",
                "classes": list(spec.class_names),
                # multi-label decisions: probability >= threshold, per class
                "thresholds": [float(t) for t in spec.decision_thresholds()],
            },
            "tta": self.tta,
            "fill": [float(v) for v in spec.fill],
            "input_spec": spec.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> ExportContract:
        data = json.loads(text)
        return cls(InputSpec.from_dict(data["input_spec"]), data["format"], bool(data["tta"]),
                   bool(data["input"]["nodata_filled_in_graph"]))


def export_metadata(model: TileClassifier, fmt: str, tta: bool, fill_nodata: bool) -> ExportContract:
    """The contract of ``model`` (thresholds of its own weights) as the exported graph keeps it."""
    return ExportContract(model.input_spec, fmt, tta, fill_nodata)


def default_out(ckpt_path: str | os.PathLike, fmt: str) -> Path:
    """``<checkpoint without .ckpt><format suffix>`` beside the checkpoint."""
    ckpt = Path(ckpt_path)
    return ckpt.with_name(ckpt.stem + FORMATS[fmt])


def metadata_path(out: str | os.PathLike) -> Path:
    """The JSON contract beside an exported file: ``<out>.json``."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt} is not one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        try:  # torch's exporter writes through onnxscript; onnx adds the metadata
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"format=onnx needs the {err.name} package: pip install 'deforest[export]'") from None


def example_input(spec: InputSpec, batch: int = 2) -> Tensor:
    """A raw batch of the contract's shape at the fill values (what tracing runs on)."""
    return torch.tensor(spec.fill, dtype=torch.float32).view(1, -1, 1, 1).expand(batch, -1, *spec.tile_size).contiguous()


def export(
    ckpt_path: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike | None = None,
    tta: bool | None = None,
    fill_nodata: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``ckpt_path``'s network as ``fmt`` to ``out`` and its contract to ``<out>.json``.

    ``out`` is never the checkpoint; an existing ``out`` is replaced only when it is an earlier
    export (its ``<out>.json`` beside it) or with ``overwrite``.

    ``tta``: ``None`` keeps the checkpoint's setting (``model.tta``). Returns a summary.
    """
    check_format(fmt)
    # weights and plain settings only; compile and other code-execution settings never come from
    # the file; a missing or unreadable file is a CheckpointError naming it
    model = TileClassifier.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    model.channels_last = False  # NHWC is a GPU speed switch, not part of the graph's meaning
    tta = bool(model.tta) if tta is None else bool(tta)
    if tta and model.spec.tile_size[0] != model.spec.tile_size[1]:
        raise ConfigError(f"tta=true needs square tiles, the checkpoint's are {model.spec.tile_size}")
    out = Path(out) if out else default_out(ckpt_path, fmt)
    check_outputs({"out": out}, {"ckpt_path": ckpt_path}, example=default_out(ckpt_path, fmt).name)
    # an earlier export has its contract beside it; any other file is the user's
    check_replaceable(out, "deforest-export", lambda path: metadata_path(path).is_file(), overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    contract = export_metadata(model, fmt, tta, fill_nodata)
    graph = RawInputClassifier(model, fill_nodata, tta).eval()
    example = example_input(model.spec)
    with torch.no_grad():
        WRITERS[fmt](graph, example, out, contract.to_json())
    metadata_path(out).write_text(contract.to_json() + "\n")
    summary = {"out": str(out), "metadata": str(metadata_path(out)), "format": fmt, "tta": tta,
               "fills_nodata": fill_nodata, "input_shape": ["batch", *example.shape[1:]],
               "classes": len(model.class_names)}
    log.info("wrote %s (%s) and %s", out, fmt, metadata_path(out))
    return summary


def _write_onnx(graph: nn.Module, example: Tensor, out: Path, metadata: str) -> None:
    """The torch.export-based exporter (``dynamo=True``, which needs ``onnxscript``): the
    TorchScript-based one loses the band-statistics features' width and refuses their batch norm."""
    import onnx

    program = torch.onnx.export(
        graph, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=_dynamic_batch(),
        opset_version=ONNX_OPSET, dynamo=True, external_data=False, optimize=True, verbose=False,
    )
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))


def _dynamic_batch() -> dict[str, dict[int, Any]]:
    return {"raw": {0: torch.export.Dim("batch", min=1)}}


def _write_torchscript(graph: nn.Module, example: Tensor, out: Path, metadata: str) -> None:
    # traced, not scripted: the heads' Python (list comprehensions, lambdas) runs once at trace
    # time; the batch size is not baked in (checked on other batch sizes in tests/mapping/test_export.py)
    model = graph.model
    # tracing reads every attribute of the LightningModule, ``trainer`` included, which raises
    # outside a Trainer unless Lightning's own TorchScript switch (to_torchscript sets it) is on
    model._jit_is_scripting = True
    try:
        with warnings.catch_warnings():
            # sizes read as Python numbers become constants: right, the tile size is the contract's
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(graph, (example,), check_trace=False)
    finally:
        del model._jit_is_scripting
    torch.jit.save(traced, str(out), _extra_files={METADATA_FILE: metadata})


def _write_exported_program(graph: nn.Module, example: Tensor, out: Path, metadata: str) -> None:
    program = torch.export.export(graph, (example,), dynamic_shapes=_dynamic_batch(), strict=False)
    torch.export.save(program, str(out), extra_files={METADATA_FILE: metadata})


WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "exported_program": _write_exported_program}


def read_metadata(path: str | os.PathLike) -> ExportContract:
    """The contract stored inside an exported file (any of the three formats)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return ExportContract.from_json(props[METADATA_KEY])
    files = {METADATA_FILE: ""}
    if path.suffix == ".pt2":
        torch.export.load(str(path), extra_files=files)
    else:
        torch.jit.load(str(path), _extra_files=files)
    return ExportContract.from_json(files[METADATA_FILE])
