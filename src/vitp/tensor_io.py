"""Reading and writing tensor files: safetensors (single or sharded) and PyTorch pickles.

A :class:`TensorSource` lists the keys of a checkpoint without loading it and loads only the tensors
asked for, so that taking the ViT out of an 8B-parameter InternVL checkpoint reads a few hundred MB.
``.bin``/``.pth`` files are only ever opened with ``torch.load(weights_only=True)``.
Every failure is a :class:`~vitp.errors.WeightFormatError` that names the file.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vitp.errors import WeightFormatError
from vitp import files
from vitp.files import atomic_path

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
# Containers that training frameworks wrap a state dict in (plain PyTorch, DeepSpeed, Lightning, timm).
_STATE_DICT_CONTAINERS = ("state_dict", "model", "module", "model_state_dict")

# The weight files of a Hugging Face style checkpoint directory, in order of preference.
DIRECTORY_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class TensorSource:
    """Keys and lazily loaded tensors of one checkpoint (a file, or shards listed by an index)."""

    def __init__(self, path: Path, key_to_file: dict[str, Path], metadata: dict[str, str] | None = None):
        self.path = path
        self.key_to_file = key_to_file
        self.metadata = metadata or {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def load(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Load the given keys, opening each file once."""
        tensors: dict[str, torch.Tensor] = {}
        for file, file_keys in self._group_by_file(keys).items():
            if file.suffix in SAFETENSORS_SUFFIXES:
                tensors.update(_load_safetensors(file, file_keys))
            else:
                state = self._pickles.get(file)
                if state is None:
                    state = self._pickles[file] = _load_pickle(file)
                tensors.update({key: state[key] for key in file_keys})
        return tensors

    def shapes(self, keys: Iterable[str]) -> dict[str, tuple[int, ...]]:
        """Shapes without reading tensor data where the format allows it (safetensors)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for file, file_keys in self._group_by_file(keys).items():
            if file.suffix in SAFETENSORS_SUFFIXES:
                with _open_safetensors(file) as handle:
                    shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in file_keys})
            else:
                shapes.update({key: tuple(t.shape) for key, t in self.load(file_keys).items()})
        return shapes

    def _group_by_file(self, keys: Iterable[str]) -> dict[Path, list[str]]:
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.key_to_file[key], []).append(key)
        return by_file


def open_tensor_source(path: Path) -> TensorSource:
    """A single weights file, or a ``*.index.json`` that maps keys to shard files."""
    path = Path(path)
    if not path.exists():
        raise WeightFormatError(f"{path}: no such file")
    if path.name.endswith(".index.json"):
        return _open_index(path)
    if path.suffix in SAFETENSORS_SUFFIXES:
        with _open_safetensors(path) as handle:
            keys = list(handle.keys())
            metadata = handle.metadata() or {}
        return TensorSource(path, {key: path for key in keys}, metadata)
    if path.suffix in PICKLE_SUFFIXES:
        state = _load_pickle(path)
        source = TensorSource(path, {key: path for key in state})
        source._pickles[path] = state
        return source
    raise WeightFormatError(
        f"{path}: unknown weights file type {path.suffix!r}; expected .safetensors, "
        f"{', '.join(PICKLE_SUFFIXES)} or a *.index.json of shards"
    )


def find_directory_weights(directory: Path) -> Path:
    """The weights file (or shard index) of a checkpoint directory."""
    for name in DIRECTORY_WEIGHT_FILES:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    present = sorted(p.name for p in directory.iterdir())[:10]
    raise WeightFormatError(
        f"{directory}: no weights found; expected one of {', '.join(DIRECTORY_WEIGHT_FILES)} "
        f"(the directory holds: {', '.join(present) or 'nothing'})"
    )


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file (config, shard index) as an object, or WeightFormatError naming it."""
    return files.read_json(path, WeightFormatError, object_only=True)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write atomically: a crash never leaves a half-written file under the final name."""
    path = Path(path)
    contiguous = {key: tensor.detach().contiguous().cpu() for key, tensor in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata={"format": "pt", **(metadata or {})})


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightFormatError(f"{path}: not a readable safetensors file ({err})") from None


def _load_safetensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    try:
        with _open_safetensors(path) as handle:
            return {key: handle.get_tensor(key) for key in keys}
    except SafetensorError as err:
        raise WeightFormatError(f"{path}: cannot read tensors ({err})") from None


def _open_index(index_path: Path) -> TensorSource:
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightFormatError(f"{index_path}: missing or empty 'weight_map' (expected {{key: shard file}})")
    key_to_file: dict[str, Path] = {}
    for key, shard in weight_map.items():
        shard_path = index_path.parent / str(shard)
        key_to_file[key] = shard_path
    missing = sorted({str(p.name) for p in key_to_file.values() if not p.is_file()})
    if missing:
        raise WeightFormatError(f"{index_path}: shard files listed in weight_map are missing: {', '.join(missing[:5])}")
    return TensorSource(index_path, key_to_file, metadata=index.get("metadata") or {})


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
    except OSError as err:
        raise WeightFormatError(f"{path}: cannot read: {err.strerror or err}") from None
    # torch.save writes a zip archive ("PK"); older PyTorch a bare pickle (protocol byte 0x80).
    if not (head == b"PK" or head[:1] == b"\x80"):
        raise WeightFormatError(f"{path}: not a readable PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's note about pickle protocols
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        detail = str(err).partition("WeightsUnpickler error:")[2].strip().splitlines()
        raise WeightFormatError(
            f"{path}: refused to load: vitp opens .bin/.pth files only with torch.load(weights_only=True), "
            f"which allows tensors and plain containers, and this file holds something else "
            f"({detail[0] if detail else 'unsupported content'}). If you trust the file, re-save its state "
            f"dict with safetensors or torch.save(model.state_dict())."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise WeightFormatError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    seen: list[str] = []
    while isinstance(obj, dict) and not _is_tensor_dict(obj):
        container = next((name for name in _STATE_DICT_CONTAINERS if isinstance(obj.get(name), dict)), None)
        if container is None:
            break
        seen.append(container)
        obj = obj[container]
    if not isinstance(obj, dict) or not _is_tensor_dict(obj):
        found = type(obj).__name__ if not isinstance(obj, dict) else f"a dict with keys {list(obj)[:8]}"
        raise WeightFormatError(
            f"{path}: expected a state dict (a mapping of names to tensors"
            f"{', possibly under ' + '/'.join(_STATE_DICT_CONTAINERS) if not seen else ''}), found {found}"
        )
    return obj


def _is_tensor_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
