"""Prediction from an exported ONNX model, without torch: onnxruntime runs the graph that
``deforest-export format=onnx`` wrote, as the :data:`~deforest.mapping.sliding.Classify` function of
:mod:`deforest.mapping.sliding` (the same windows, blending, nodata handling and writers as a checkpoint).

The contract comes from the file itself (``metadata_props``, key ``deforest.export``), read
through onnxruntime, so neither torch nor the ``onnx`` package is needed. Nothing here imports
torch; :func:`load_model` imports :mod:`deforest.mapping.predict` (torch) only for a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from deforest.core.contract import InputSpec
from deforest.core.errors import ConfigError
from deforest.core.safety import CheckpointError
from deforest.mapping.sliding import Classify

#: what makes ``ckpt_path`` an exported model rather than a checkpoint
ONNX_SUFFIX = ".onnx"
#: the ``metadata_props`` key of the contract, read here and written by deforest.mapping.export (a
#: stable name: exported files carry it)
METADATA_KEY = "deforest.export"
#: the exported graphs' input and output versions this reader understands (deforest.mapping.export.EXPORT_VERSION)
EXPORT_VERSIONS = (1, 2)  # 1: the contract written flat, read by InputSpec.from_dict too


def is_onnx(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ONNX_SUFFIX


def load_model(path: str | os.PathLike, device: str = "auto") -> tuple[Classify, InputSpec]:
    """The model at ``path`` as a batch -> probabilities function, and its input contract:
    an exported ``.onnx`` file through onnxruntime, anything else as a checkpoint (torch)."""
    if is_onnx(path):
        return load_onnx(path, device)
    # torch, Lightning and the network: only for a checkpoint
    from deforest.mapping.predict import load_classifier, probabilities, resolve_device

    model, spec = load_classifier(path, resolve_device(device))
    return probabilities(model), spec


def providers(device: str) -> list[str]:
    """onnxruntime execution providers for ``device``: ``cpu``, ``cuda`` or ``auto`` (CUDA when
    this onnxruntime build has it)."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" not in available:
        raise ConfigError(f"device={device}: this onnxruntime has no CUDA provider ({', '.join(available)}); "
                          "install onnxruntime-gpu or use device=cpu")
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def load_onnx(path: str | os.PathLike, device: str = "auto") -> tuple[Classify, InputSpec]:
    """An exported ONNX model as a batch -> probabilities function and its input contract."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"{path}: an ONNX model needs the onnxruntime package: pip install onnxruntime") from None
    if not Path(path).is_file():
        raise CheckpointError(path, "model not found")
    state = onnxruntime.capi.onnxruntime_pybind11_state
    try:
        session = onnxruntime.InferenceSession(str(path), providers=providers(device))
    except (state.Fail, state.InvalidGraph, state.InvalidProtobuf, state.NoSuchFile) as err:
        raise CheckpointError(path, f"is not a readable ONNX model: {str(err).splitlines()[0]}") from None
    contract = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if contract is None:
        raise CheckpointError(path, f"has no {METADATA_KEY} metadata: not a model written by deforest-export")
    data = json.loads(contract)
    if data.get("export_version") not in EXPORT_VERSIONS:
        raise CheckpointError(path, f"is export version {data.get('export_version')}; this deforest reads {list(EXPORT_VERSIONS)}")
    spec = InputSpec.from_dict(data["input_spec"])
    input_name, output_name = data["input"]["name"], data["output"]["name"]
    shape = list(spec.tile_size)

    def classify(windows: np.ndarray) -> np.ndarray:
        # the graph's tile size is fixed at export; a tile_size= override cannot change it
        if list(windows.shape[2:]) != shape:
            raise ConfigError(f"{path}: the ONNX model takes {shape[0]}x{shape[1]} windows, not "
                              f"{windows.shape[2]}x{windows.shape[3]} (tile_size= cannot change an exported model)")
        # windows arrive prepared (the scene's nodata at its band's fill, InputSpec.prepare), as the
        # checkpoint path gets them: the graph's own fill then finds nothing left to fill (unless the
        # scene declares another nodata and holds the training nodata value as a valid pixel)
        (probs,) = session.run([output_name], {input_name: np.ascontiguousarray(windows, np.float32)})
        return probs

    return classify, spec
