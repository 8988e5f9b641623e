"""Reading and writing DLRM checkpoints safely.

Accepted inputs: a checkpoint dict written by dlrm's `--save-model` (its "state_dict" is used),
a bare state dict of dlrm's or TorchRec's layout (layouts.py), a zip written by
evaluate_disk_savings.py that holds one of those, or a torchsnapshot or DCP folder (stores.py).
Loading is always `weights_only=True`; only the numpy scalars and dtypes that dlrm puts in its
bookkeeping are allow-listed. Zips are read in memory, never extracted to disk.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from zlib_ng import zlib_ng

from dlrm_sparsity.archive import Chunks, write_streamed
from dlrm_sparsity.deflate import ParallelDeflate
from dlrm_sparsity.errors import CheckpointError
from dlrm_sparsity.model import DLRMConfig
from dlrm_sparsity.runner.atomic import atomic_path
from dlrm_sparsity.stores import folder_files, load_folder, open_folder

COMPRESSORS = ("zlib-ng", "zlib")
_TORCH_ZIP_MARKER = "data.pkl"  # every torch.save zip archive has <prefix>/data.pkl


def _numpy_safe_globals() -> list:
    """numpy scalar reconstruction, as found in dlrm's test_acc / train_loss fields."""
    core = getattr(np, "_core", None) or np.core
    found = [core.multiarray.scalar, np.dtype]
    found += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return found


def _torch_load_safe(source, origin: str, mmap: bool = False) -> object:
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        match = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if match and re.search(r"ShardedTensor|DTensor|_shard", match.group(1)):
            raise CheckpointError(
                f"{origin}: holds sharded tables ({match.group(1).rsplit('.', 1)[-1]}); save "
                "them with torchsnapshot or DCP, or gather them into one plain state dict "
                "(docs/usage.md, 'Checkpoint folders')") from None
        if match:
            raise CheckpointError(
                f"{origin}: refused to load: it needs the pickled global '{match.group(1)}', "
                "which is not allowed in safe (weights_only) loading") from None
        raise CheckpointError(f"{origin}: not a readable PyTorch checkpoint") from None
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{origin}: not a readable PyTorch checkpoint ({first})") from None


def _extract_state_dict(obj: object, origin: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):  # dlrm's --save-model dict, or a training loop's
        inner = next((k for k in ("state_dict", "model_state_dict", "model")
                      if isinstance(obj.get(k), Mapping)), None)
        obj = obj[inner] if inner else obj
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor)
                                                for v in obj.values()):
        raise CheckpointError(f"{origin}: not a DLRM checkpoint (no state dict inside)")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{origin}: not a state dict (entry '{bad[0]}' is not a tensor)")
    return dict(obj)


def _inner_member(zf: zipfile.ZipFile, origin: str) -> str:
    members = [i.filename for i in zf.infolist() if not i.is_dir()]
    if not members:
        raise CheckpointError(f"{origin}: zip file holds no checkpoint")
    if len(members) > 1:
        named = [m for m in members if m.endswith((".pt", ".pth", ".ckpt", ".bin"))]
        if len(named) != 1:
            raise CheckpointError(f"{origin}: zip file holds {len(members)} files and no "
                                  "single checkpoint (.pt/.pth/.ckpt)")
        return named[0]
    return members[0]


def _is_torch_archive(zf: zipfile.ZipFile) -> bool:
    return any(n == _TORCH_ZIP_MARKER or n.endswith("/" + _TORCH_ZIP_MARKER)
               for n in zf.namelist())


def member_of(path: str | os.PathLike) -> str | None:
    """The checkpoint member of a zip that wraps one (the disk step's pruned zips), else None
    (a plain torch.save file, a folder, or anything that is no zip)."""
    if os.path.isdir(path) or not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            return None if _is_torch_archive(zf) else _inner_member(zf, str(path))
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: damaged zip file ({exc})") from None


def is_torch_archive(path: str | os.PathLike) -> bool:
    """A plain torch.save file (dlrm's checkpoints are), which torch.load can memory-map."""
    if os.path.isdir(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return _is_torch_archive(zf)
    except (zipfile.BadZipFile, OSError):
        return False


def load_checkpoint_object(path: str | os.PathLike, mmap: bool = False) -> object:
    """Whatever torch.load safely returns for this file (reading a zip's member in memory).

    mmap=True maps a plain torch.save archive instead of reading it (tensors are read from the
    file when touched), and a zip's member once inflated into a file beside it; a legacy file
    is read as usual.
    """
    origin = str(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{origin}: checkpoint file not found")
    if os.path.isdir(path):  # torchsnapshot's or DCP's, read table by table
        return load_folder(path, mmap)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                if _is_torch_archive(zf):
                    return _torch_load_safe(origin, origin, mmap)  # a plain torch.save archive
                member = _inner_member(zf, origin)
                if mmap:
                    return _load_inflated(zf, member, Path(path), f"{origin}:{member}")
                payload = zf.read(member)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
            raise CheckpointError(f"{origin}: damaged zip file ({exc})") from None
        return _torch_load_safe(io.BytesIO(payload), f"{origin}:{member}")
    return _torch_load_safe(origin, origin)


def _load_inflated(zf: zipfile.ZipFile, member: str, path: Path, origin: str) -> object:
    """A zip's member inflated into a file beside the zip and memory-mapped from there: for a
    pruned model larger than memory, which a deflated zip cannot be mapped from. The file is
    unlinked once mapped (the map keeps it until the tensors go), so nothing stays behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".inflated", dir=path.parent)
    os.close(fd)
    try:
        inflate_member(zf, member, tmp)
        return _torch_load_safe(tmp, origin, mmap=True)
    finally:
        os.unlink(tmp)


def inflate_member(zf: zipfile.ZipFile, member: str, dest: str | os.PathLike) -> None:
    """A zip's member inflated into the file dest, 16 MiB at a time."""
    with open(dest, "wb") as out, zf.open(member) as src:
        shutil.copyfileobj(src, out, 16 * 2**20)


def shapes_for_tables(mapped: Mapping[str, torch.Tensor], tables: set[str]
                      ) -> dict[str, torch.Tensor]:
    """A mapped state dict with its `tables` as their shape and dtype only (meta) and every
    other tensor (the small MLPs) copied out of the map."""
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") if k in tables else v.clone()
            for k, v in mapped.items()}


def load_state_dict(path: str | os.PathLike, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The model state dict in a checkpoint, a bare state dict, or a disk-savings zip."""
    return _extract_state_dict(load_checkpoint_object(path, mmap), str(path))


def load_dlrm_state_dict(path: str | os.PathLike, mmap: bool = False
                         ) -> dict[str, torch.Tensor]:
    """load_state_dict, checked to be a DLRM's (dlrm's or TorchRec's); errors name the file."""
    state_dict = load_state_dict(path, mmap)
    try:
        DLRMConfig.from_state_dict(state_dict)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return state_dict


class CheckpointTables:
    """The tensors of a plain torch.save checkpoint, read one at a time through a memory map.

    For models too large to hold twice: the source stays on disk (in the page cache, outside
    this process), and each read maps the file, copies one tensor out and unmaps it again, so
    a caller holds one original table at a time instead of the whole model. Refuses to read
    once the file has changed, since the run's results would then mix two models.
    """

    def __init__(self, path: str | os.PathLike):
        self.path, self.origin = os.fspath(path), str(path)
        self.folder = open_folder(path) if os.path.isdir(path) else None
        self.stamp = self._stamp()

    def _stamp(self) -> tuple[int, int]:
        files = folder_files(self.path) if self.folder else [Path(self.path)]
        try:
            stats = [os.stat(f) for f in files]
        except OSError as exc:
            raise CheckpointError(f"{self.origin}: cannot read the checkpoint "
                                  f"({exc.strerror})") from None
        return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)

    def read(self, name: str, copy: bool = True) -> torch.Tensor:
        """A private in-memory copy of one tensor, or (copy False) a view of it in the file,
        mapped privately (the file is never written), whose map lasts as long as the view."""
        if self._stamp() != self.stamp:
            raise CheckpointError(f"{self.origin}: the checkpoint changed during the run")
        if self.folder is not None:
            table = self.folder.read(name, mmap=True)
            return table.clone() if copy else table
        mapped = _extract_state_dict(_torch_load_safe(self.path, self.origin, mmap=True),
                                     self.origin)
        return mapped[name].clone() if copy else mapped[name]

    def pieces(self, name: str) -> list[tuple[list[int], torch.Tensor]]:
        """One tensor as it is stored, each piece at its offsets, mapped where it lies and
        never put together: the shards of a folder's table (a job that sharded it row- or
        column-wise saved it so), else the whole tensor as one piece."""
        if self.folder is None:
            table = self.read(name, copy=False)
            return [([0] * table.dim(), table)]
        if self._stamp() != self.stamp:
            raise CheckpointError(f"{self.origin}: the checkpoint changed during the run")
        return self.folder.pieces(name, mmap=True)


def sha256_of_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """The file's sha256; a checkpoint folder's is that of its files' names and bytes."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in folder_files(root) if root.is_dir() else [root]:
        if root.is_dir():
            digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda f=f: f.read(chunk_bytes), b""):
                digest.update(block)
    return digest.hexdigest()


def compressor_label(compressor: str) -> str:
    """The compressor with its library's version: the bytes (and sizes) depend on both."""
    if compressor == "zlib":
        return f"zlib {zlib.ZLIB_RUNTIME_VERSION}"
    if compressor == "zlib-ng":
        return f"zlib-ng {zlib_ng.ZLIBNG_VERSION}"
    raise ValueError(f"unknown compressor {compressor!r}: expected one of {COMPRESSORS}")


def member_name(zip_path: str | os.PathLike) -> str:
    """The seed's name for the checkpoint inside a zip: its metrics script extracts the member
    and loads `<zip stem>.ckpt`, so it reads our zips too."""
    return f"{Path(zip_path).stem}.ckpt"


def copy_zip_renamed(source: str | os.PathLike, zip_path: str | os.PathLike) -> int:
    """Copy a one-member zip of save_state_dict_zip to zip_path, its member renamed to match,
    without deflating again; returns the new zip's size.

    zipfile can neither rename a member nor write one without compressing it. The grid points
    that share weights (level 0 or 1 of every config) have names of the same length (they
    differ in the norm or the folder), so the name's bytes are overwritten in place, in the
    local header (30 bytes in) and in the central directory entry (46 bytes in).
    """
    zip_path = Path(zip_path)
    new = member_name(zip_path).encode()
    with zipfile.ZipFile(source) as zf:
        (info,) = zf.infolist()
        places = (info.header_offset + 30, zf.start_dir + 46)
    old = info.filename.encode()
    if len(old) != len(new):
        raise ValueError(f"{source}: member {info.filename!r} cannot be renamed in place to "
                         f"{new.decode()!r}")
    with atomic_path(zip_path) as tmp:
        shutil.copyfile(source, tmp)
        with open(tmp, "r+b") as f:
            for at in places:
                f.seek(at)
                if f.read(len(old)) != old:
                    raise ValueError(f"{source}: unexpected zip layout")
                f.seek(at)
                f.write(new)
    return zip_path.stat().st_size


class _InPieces:
    """Writes into a zip member in pieces of at most 16 MiB, with zlib-ng's CRC-32.

    torch.save writes each storage in one call, and zipfile's writer returns a call's whole
    deflated output at once: for a 618 MiB table, up to twice its compressed size held in
    memory before it reaches the file. And zipfile takes the member's CRC-32 from the stdlib's
    zlib on the writing thread, where zlib-ng's gives the same values several times as fast
    (benchmarks/bench_deflate.py): on a 2 GB checkpoint, CPU time the deflate threads want.
    So each piece goes through zipfile's own write steps here, with zlib-ng's CRC, for this
    member alone (zipfile has no public hook for either).
    """

    PIECE = 16 * 2**20
    _STEPS = ("_file_size", "_crc", "_compressor", "_compress_size", "_fileobj")

    def __init__(self, member):
        if not all(hasattr(member, a) for a in self._STEPS):
            raise RuntimeError("this Python's zipfile writes members in a way the suite does "
                               "not know; use a Python from 3.10 to 3.13")
        self.member = member

    def write(self, data) -> int:
        view, m = memoryview(data).cast("B"), self.member
        for start in range(0, len(view), self.PIECE):
            piece = view[start:start + self.PIECE]
            m._file_size += len(piece)
            m._crc = zlib_ng.crc32(piece, m._crc)
            deflated = m._compressor.compress(piece)
            m._compress_size += len(deflated)
            m._fileobj.write(deflated)
        return len(view)

    def flush(self) -> None:
        self.member.flush()


def save_state_dict_zip(state_dict: Mapping[str, torch.Tensor], zip_path: str | os.PathLike,
                        compresslevel: int = 6, compressor: str = "zlib-ng",
                        threads: int = 1, tables: Mapping[str, Chunks] | None = None) -> int:
    """Stream torch.save(state_dict) into a deflated zip member; return the zip's size in bytes.

    No uncompressed copy is written anywhere: torch.save writes straight into the zip member.
    With `tables`, the tensors it names are made as they are written, chunk by chunk
    (archive.write_streamed: the same bytes, without the tensors ever held whole).
    Both compressors write standard deflate that any unzip reads. "zlib" is what Python's
    zipfile uses, so it deflates as the seed did; "zlib-ng" deflates the same input in about
    two thirds of the time, into a stream a few percent smaller at high sparsity. Level 6 is
    the default of both. With threads > 1 the member is deflated on that many threads into
    one standard stream (deflate.ParallelDeflate), a few bytes per MiB larger.
    """
    compressor_label(compressor)  # an unknown name fails before anything is written
    zip_path = Path(zip_path)
    # A fixed timestamp makes the zip a function of the weights and its name alone: a rerun
    # writes byte-identical files (and sha256s).
    member = zipfile.ZipInfo(member_name(zip_path), date_time=(1980, 1, 1, 0, 0, 0))
    member.compress_type = zipfile.ZIP_DEFLATED
    # the level must sit on the ZipInfo (renamed compress_level in Python 3.13)
    setattr(member, "compress_level" if hasattr(member, "compress_level") else "_compresslevel",
            compresslevel)
    with atomic_path(zip_path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED,
                             compresslevel=compresslevel) as zf:
            with zf.open(member, "w", force_zip64=True) as f:
                writer = _InPieces(f)
                module = zlib_ng if compressor == "zlib-ng" else zlib
                if compressor == "zlib-ng" or threads > 1:
                    # zipfile deflates with the stdlib's zlib on one thread; hand this
                    # member's stream to another compressor (raw deflate, as zipfile's own)
                    f._compressor = (ParallelDeflate(module, compresslevel, threads)
                                     if threads > 1 else
                                     module.compressobj(compresslevel, module.DEFLATED, -15))
                if tables:
                    write_streamed(state_dict, writer, tables, writer.PIECE)
                else:
                    torch.save(dict(state_dict), writer)
    return zip_path.stat().st_size
