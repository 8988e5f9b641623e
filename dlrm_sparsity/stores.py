"""Checkpoint folders as large TorchRec jobs store them: torchsnapshot's and DCP's.

- torchsnapshot (MLCommons ships DLRM v2 so): a `.snapshot_metadata` manifest (YAML) naming,
  for each entry `<rank>/<app state>/<key>`, a Tensor (a file under the folder, a byte range in
  it, and a serializer: raw bytes, `buffer_protocol`, or `torch_save`), or a ShardedTensor or
  ChunkedTensor made of such tensors at offsets.
- torch.distributed.checkpoint (DCP): a `.metadata` file listing each key's size, dtype and
  chunks, and each chunk's place (file, offset, length) among the `.distcp` files; each chunk is
  stored as a small torch.save archive (not compressed).

Both are read table by table. With mmap, a tensor stored whole as raw bytes (every
torchsnapshot buffer, and every DCP chunk that is a tensor's whole storage) is a private,
read-only map of its bytes in the file, as `torch.load(mmap=True)` gives for a plain file:
nothing is read until it is touched; a tensor cut into shards or chunks is then only its shape
(meta), and is put together in memory when it is read for itself, one table at a time.
Neither library is needed for this (the formats are read as laid out); the tests write both
with the real libraries. What does not fit the layout is one line naming
the folder and the entry.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
import yaml

from dlrm_sparsity.archive import ReadView
from dlrm_sparsity.errors import CheckpointError

SNAPSHOT, DCP = "torchsnapshot", "dcp"
SNAPSHOT_MANIFEST, DCP_METADATA = ".snapshot_metadata", ".metadata"
APP_STATE = "model"  # the app state a DLRM's snapshot is usually taken under


def folder_kind(path: str | os.PathLike) -> str | None:
    """torchsnapshot or dcp for a checkpoint folder of either kind, else None."""
    if (Path(path) / SNAPSHOT_MANIFEST).is_file():
        return SNAPSHOT
    if (Path(path) / DCP_METADATA).is_file():
        return DCP
    return None


def _dtype(name: str, origin: str) -> torch.dtype:
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{origin}: unknown dtype {name!r}")
    return dtype


def _raw(file: Path, start: int, shape: list[int], dtype: torch.dtype, mmap: bool,
         origin: str) -> torch.Tensor:
    """A tensor stored as raw bytes from `start` in a file: mapped privately, or read."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not file.is_file():
        raise CheckpointError(f"{origin}: its data file {file.name} is missing")
    if start + nbytes > file.stat().st_size:
        raise CheckpointError(f"{origin}: {file.name} is shorter than the tensor it should "
                              f"hold ({file.stat().st_size} bytes, the tensor ends at "
                              f"{start + nbytes})")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if mmap:  # copy-on-write, as torch.load(mmap=True): the file is never written
        data = np.memmap(file, dtype=np.uint8, mode="c", offset=start, shape=(nbytes,))
    else:
        data = np.fromfile(file, dtype=np.uint8, count=nbytes, offset=start)
    return torch.from_numpy(data).view(dtype).view(shape)


def _assemble(pieces: list[tuple[list[int], torch.Tensor]], shape: list[int] | None
              ) -> torch.Tensor:
    """Shards or chunks at their offsets, put together in one new tensor."""
    if shape is None:
        shape = [max(o[d] + t.shape[d] for o, t in pieces) for d in range(pieces[0][1].dim())]
    whole = torch.empty(shape, dtype=pieces[0][1].dtype)
    for offsets, piece in pieces:
        whole[tuple(slice(o, o + s) for o, s in zip(offsets, piece.shape, strict=True))] = piece
    return whole


class SnapshotFolder:
    """A torchsnapshot folder's model state dict, read entry by entry."""

    def __init__(self, path: str | os.PathLike):
        self.root, self.origin = Path(path), str(path)
        try:
            manifest = yaml.safe_load((self.root / SNAPSHOT_MANIFEST).read_text())["manifest"]
        except (OSError, yaml.YAMLError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{self.origin}: unreadable {SNAPSHOT_MANIFEST} "
                                  f"({type(exc).__name__})") from None
        self.manifest = manifest
        dicts = {k: v for k, v in manifest.items() if isinstance(v, dict) and
                 v.get("type") in ("OrderedDict", "dict") and k.count("/") == 1}
        app = next((k for k in dicts if k.endswith("/" + APP_STATE)), None)
        if app is None and len(dicts) == 1:
            app = next(iter(dicts))
        if app is None:
            raise CheckpointError(f"{self.origin}: no '{APP_STATE}' app state in the snapshot "
                                  f"(found: {', '.join(sorted(dicts)) or 'none'})")
        self.keys = [str(k) for k in dicts[app]["keys"]]
        self.entries = {k: f"{app}/{k}" for k in self.keys}

    def read(self, key: str, mmap: bool, shape_only: bool = False) -> torch.Tensor:
        """One tensor: mapped (mmap) or read; with shape_only, a tensor stored in several
        shards is only its shape and dtype (on the meta device)."""
        entry, origin = self._entry(key)
        return self._tensor(entry, origin, mmap, shape_only)

    def pieces(self, key: str, mmap: bool) -> list[tuple[list[int], torch.Tensor]]:
        """One tensor as it is stored: its shards (or the whole tensor) at their offsets, each
        mapped (mmap) or read, none put together."""
        entry, origin = self._entry(key)
        if entry.get("type") in ("ShardedTensor", "ChunkedTensor"):
            return self._shards(self._parts(entry, origin), origin, mmap)
        tensor = self._tensor(entry, origin, mmap)
        return [([0] * tensor.dim(), tensor)]

    def _entry(self, key: str) -> tuple[dict, str]:
        name = self.entries[key]
        entry = self.manifest.get(name)
        if entry is None:
            raise CheckpointError(f"{self.origin}: the manifest lists '{key}' but holds no "
                                  f"entry '{name}'")
        return entry, f"{self.origin}: '{key}'"

    def _shards(self, parts: list[dict], origin: str, mmap: bool
                ) -> list[tuple[list[int], torch.Tensor]]:
        return [(list(p["offsets"]), self._tensor(p["tensor"], origin, mmap)) for p in parts]

    @staticmethod
    def _parts(entry: dict, origin: str) -> list[dict]:
        parts = entry.get("shards") or entry.get("chunks") or []
        if not parts:
            raise CheckpointError(f"{origin}: a {entry.get('type')} with no shards")
        return parts

    def _tensor(self, entry: dict, origin: str, mmap: bool, shape_only: bool = False
                ) -> torch.Tensor:
        kind = entry.get("type")
        if kind == "Tensor":
            file = self.root / entry["location"]
            start, end = entry.get("byte_range") or (0, None)
            if entry.get("serializer") == "torch_save":
                if not file.is_file():
                    raise CheckpointError(f"{origin}: its data file {file.name} is missing")
                with open(file, "rb") as f:
                    f.seek(start)
                    blob = f.read(None if end is None else end - start)
                return torch.load(io.BytesIO(blob), weights_only=True)
            return _raw(file, start, list(entry["shape"]), _dtype(entry["dtype"], origin),
                        mmap, origin)
        if kind in ("ShardedTensor", "ChunkedTensor"):
            parts = self._parts(entry, origin)
            if len(parts) > 1 and shape_only:  # put together only when read for itself
                shape = entry.get("shape") or [
                    max(p["offsets"][d] + p["sizes"][d] for p in parts)
                    for d in range(len(parts[0]["sizes"]))]
                return torch.empty(shape, dtype=_dtype(parts[0]["tensor"]["dtype"], origin),
                                   device="meta")
            pieces = self._shards(parts, origin, mmap)
            if len(pieces) == 1 and not any(pieces[0][0]):
                return pieces[0][1]
            return _assemble(pieces, entry.get("shape"))
        raise CheckpointError(f"{origin}: a {kind} entry, not a tensor")


class DCPFolder:
    """A torch.distributed.checkpoint folder's tensors, read key by key."""

    def __init__(self, path: str | os.PathLike):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.root, self.origin = Path(path), str(path)
        try:
            metadata = FileSystemReader(str(path)).read_metadata()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as exc:
            raise CheckpointError(f"{self.origin}: unreadable {DCP_METADATA} "
                                  f"({type(exc).__name__})") from None
        self.tensors = {k: v for k, v in metadata.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata)}
        self.keys = list(self.tensors)
        self.places: dict[str, list] = {}
        for index, info in metadata.storage_data.items():
            self.places.setdefault(index.fqn, []).append((list(index.offset), info))

    def read(self, key: str, mmap: bool, shape_only: bool = False) -> torch.Tensor:
        """As SnapshotFolder.read."""
        meta = self.tensors[key]
        if len(self._places(key)) > 1 and shape_only:
            return torch.empty(list(meta.size), dtype=meta.properties.dtype, device="meta")
        pieces = self.pieces(key, mmap)
        if len(pieces) == 1 and list(pieces[0][1].shape) == list(meta.size):
            return pieces[0][1]
        return _assemble(pieces, list(meta.size))

    def pieces(self, key: str, mmap: bool) -> list[tuple[list[int], torch.Tensor]]:
        """As SnapshotFolder.pieces."""
        meta, origin = self.tensors[key], f"{self.origin}: '{key}'"
        sizes = {tuple(c.offsets): list(c.sizes) for c in meta.chunks}
        return [(offsets, self._chunk(info, sizes[tuple(offsets)], meta.properties.dtype,
                                      mmap, origin)) for offsets, info in self._places(key)]

    def _places(self, key: str) -> list:
        """The key's stored chunks, (offsets, storage info) each, as many as it lists."""
        meta, places = self.tensors[key], self.places.get(key, [])
        if not places or len(places) != len(meta.chunks):
            raise CheckpointError(f"{self.origin}: '{key}': {DCP_METADATA} lists "
                                  f"{len(meta.chunks)} chunks of it and stores {len(places)}")
        return places

    def _chunk(self, info, sizes: list[int], dtype: torch.dtype, mmap: bool, origin: str
               ) -> torch.Tensor:
        """One stored chunk: its torch.save archive's single storage, read (or mapped) from
        the file where it is exactly the chunk's bytes, else loaded."""
        file = self.root / info.relative_path
        if not file.is_file():
            raise CheckpointError(f"{origin}: its data file {info.relative_path} is missing")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{origin}: stored with transforms "
                                  f"{info.transform_descriptors}, which the suite does not read")
        nbytes = math.prod(sizes) * dtype.itemsize
        with open(file, "rb") as f:
            try:
                records = [i for i in zipfile.ZipFile(_Slice(f, info.offset, info.length)
                                                      ).infolist() if "/data/" in i.filename]
            except (zipfile.BadZipFile, OSError, EOFError):
                raise CheckpointError(f"{origin}: its chunk in {info.relative_path} is not a "
                                      "whole torch.save archive") from None
            if (len(records) == 1 and records[0].file_size == nbytes
                    and records[0].compress_type == zipfile.ZIP_STORED):
                f.seek(info.offset + records[0].header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", f.read(4))
                start = info.offset + records[0].header_offset + 30 + name_len + extra_len
                return _raw(file, start, sizes, dtype, mmap, origin)
            f.seek(info.offset)
            return torch.load(io.BytesIO(f.read(info.length)), weights_only=True).reshape(sizes)


class _Slice(ReadView):
    """A byte range of an open file, as a file (for zipfile to read one DCP chunk's archive
    directory without reading the chunk)."""

    def __init__(self, f, start: int, length: int):
        super().__init__()
        self.f, self.start, self.size = f, start, length

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.at if n is None or n < 0 else min(n, self.size - self.at)
        self.f.seek(self.start + self.at)
        data = self.f.read(max(0, n))
        self.at += len(data)
        return data


def open_folder(path: str | os.PathLike) -> SnapshotFolder | DCPFolder:
    """A torchsnapshot or DCP folder, its keys listed and its tensors read one at a time."""
    kind = folder_kind(path)
    if kind is None:
        raise CheckpointError(f"{path}: is a folder, but neither a torchsnapshot "
                              f"({SNAPSHOT_MANIFEST}) nor a DCP checkpoint ({DCP_METADATA})")
    return SnapshotFolder(path) if kind == SNAPSHOT else DCPFolder(path)


def load_folder(path: str | os.PathLike, mmap: bool) -> dict[str, torch.Tensor]:
    """Every tensor of a torchsnapshot or DCP folder's model, by key, in the stored order:
    read, or with mmap, mapped where stored whole and only shape and dtype (meta) where
    stored in several shards (CheckpointTables reads such a table when it is needed), so
    that nothing of the tables is read yet."""
    folder = open_folder(path)
    return {key: folder.read(key, mmap, shape_only=mmap) for key in folder.keys}


def folder_files(path: str | os.PathLike) -> list[Path]:
    """Every file of a checkpoint folder, in a fixed order (for its fingerprint)."""
    root = Path(path)
    return sorted((p for p in root.rglob("*") if p.is_file()),
                  key=lambda p: p.relative_to(root).as_posix())
