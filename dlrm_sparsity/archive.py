"""torch.save's bytes of a state dict, written while its tables are still being made.

torch.save needs every tensor in memory at once: for a pruned model, a copy of the whole
model. The archive it writes is a zip (stored, not deflated) whose layout depends only on the
tensors' shapes, dtypes and order, and whose data records are each followed by a data
descriptor holding their CRC-32. So the layout is written first, by torch.save itself under
`torch.serialization.skip_data()` (it then seeks over each storage instead of writing it), and
the bytes are then sent in order, each storage's taken from its source chunk by chunk. What
torch.save would have computed from the data is filled in as the data passes: the CRC-32 in
each record's data descriptor and in the central directory, and the `.data/serialization_id`
record, which combines every record's CRC-32 (as c10::hash_combine does). The result is
byte-identical to torch.save's (tests/test_archive.py), with only one chunk in memory.
torch has no API for any of this (torch.save takes whole tensors), hence this module.
"""

from __future__ import annotations

import io
import struct
import zipfile
from typing import Callable, Iterable, Mapping

import torch
from zlib_ng import zlib_ng

Chunks = Callable[[], Iterable[torch.Tensor]]
_DESCRIPTOR = b"PK\x07\x08"
_CENTRAL_CRC = 16  # bytes into a central directory entry
_SERIALIZATION_ID = ".data/serialization_id"
_MASK64 = (1 << 64) - 1


class _Layout(io.RawIOBase):
    """What torch.save writes under skip_data: its bytes, and the storages' places as holes."""

    def __init__(self):
        super().__init__()
        self.pieces: list[bytes | int] = []  # bytes written, or a hole's size
        self.pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.pieces.append(bytes(data))
        self.pos += len(self.pieces[-1])
        return len(self.pieces[-1])

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_CUR or offset < 0:
            raise io.UnsupportedOperation("torch.save's skip_data only seeks forward")
        self.pieces.append(offset)
        self.pos += offset
        return self.pos

    def tell(self) -> int:
        return self.pos


class ReadView(io.RawIOBase):
    """A read-only file of `size` bytes whose subclass says what read() gives: for zipfile,
    which seeks and reads only what it needs."""

    size = 0
    at = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.at = {io.SEEK_SET: 0, io.SEEK_CUR: self.at, io.SEEK_END: self.size}[whence] + offset
        return self.at

    def tell(self) -> int:
        return self.at


class _Sparse(ReadView):
    """The layout read back as a file whose holes read as zeros, never allocated: for
    zipfile, which reads only the directory at the end."""

    def __init__(self, pieces: list[bytes | int]):
        super().__init__()
        self.spans, at = [], 0
        for piece in pieces:
            size = piece if isinstance(piece, int) else len(piece)
            self.spans.append((at, piece))
            at += size
        self.size = at

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.at + n)
        out = bytearray()
        for start, piece in self.spans:
            size = piece if isinstance(piece, int) else len(piece)
            lo, hi = max(start, self.at), min(start + size, end)
            if lo < hi:
                out += bytes(hi - lo) if isinstance(piece, int) else piece[lo - start:hi - start]
        self.at = max(self.at, end)
        return bytes(out)


def storage_order(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """For each storage torch.save writes, in its order, the first key that holds it (the
    pickler meets a dict's values in order and numbers each new storage)."""
    seen, names = set(), []
    for name, tensor in state_dict.items():
        key = tensor.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64 bits, as torch's writer folds the records' CRC-32s."""
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & _MASK64) + (seed >> 2)) & _MASK64)
            ) & _MASK64


def _storage_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a tensor's whole storage (torch.save writes the storage, not the view)."""
    whole = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())
    return memoryview(whole.numpy()).cast("B")


def _chunk_bytes(chunk: torch.Tensor) -> memoryview:
    return memoryview(chunk.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())


def write_streamed(state_dict: Mapping[str, torch.Tensor], out, tables: Mapping[str, Chunks],
                   piece_bytes: int | None = None) -> None:
    """Write torch.save(state_dict)'s exact bytes to out.write, the tensors named in `tables`
    taken from tables[name]() (contiguous chunks whose bytes, in order, are the tensor's) as
    they are written. Their state_dict entries give only shape and dtype (meta is fine); each
    is its own storage. The chunks' bytes must add up to the tensor's. Each storage reaches
    out.write in writes of `piece_bytes` (the last shorter), or as its chunks come (None):
    a deflater's output depends on where its input is cut."""
    skeleton = {k: torch.empty(v.shape, dtype=v.dtype) if k in tables else v
                for k, v in state_dict.items()}  # torch.empty: never touched, never resident
    layout = _Layout()
    with torch.serialization.skip_data():
        torch.save(skeleton, layout)
    # torch seeks over each storage that has bytes; data/<k> is the k-th storage
    holes = [(k, n) for k, n in enumerate(storage_order(skeleton))
             if skeleton[n].untyped_storage().nbytes()]
    places = [i for i, p in enumerate(layout.pieces) if isinstance(p, int)]
    if not places:  # nothing but empty storages: the layout is the archive
        for piece in layout.pieces:
            out.write(piece)
        return
    last_hole = places[-1]
    crcs: dict[str, int] = {}
    at, previous = 0, None
    for piece in layout.pieces[:last_hole + 2]:  # up to the last storage's descriptor
        if isinstance(piece, int):  # a storage's place
            k, name = holes[len(crcs)]
            last_crc = _write_storage(name, piece, skeleton, tables, out, piece_bytes)
            crcs[f"data/{k}"] = last_crc
        elif isinstance(previous, int):  # the descriptor after a storage: its CRC
            if not piece.startswith(_DESCRIPTOR):
                raise ValueError("torch.save wrote no data descriptor after a storage: a "
                                 "torch this module does not know")
            out.write(piece[:4] + struct.pack("<I", last_crc) + piece[8:])
        else:
            out.write(piece)
        at += piece if isinstance(piece, int) else len(piece)
        previous = piece
    tail, cut = _tail(layout, at, crcs), 0
    for piece in layout.pieces[last_hole + 2:]:  # the writes torch.save made, cut alike
        out.write(tail[cut:cut + len(piece)])
        cut += len(piece)


def _write_storage(name: str, size: int, skeleton: Mapping[str, torch.Tensor],
                   tables: Mapping[str, Chunks], out, piece: int | None) -> int:
    """One storage's bytes written (regrouped into `piece`-byte writes from its start, as a
    writer that cuts torch.save's one write per storage into pieces would see them); their
    CRC-32."""
    crc, written, held = 0, 0, bytearray()
    chunks = tables[name]() if name in tables else [skeleton[name]]
    for chunk in chunks:
        data = _chunk_bytes(chunk) if name in tables else _storage_bytes(chunk)
        crc, written = zlib_ng.crc32(data, crc), written + len(data)
        if piece is None:
            out.write(data)
            continue
        if held:
            take = min(piece - len(held), len(data))
            held += data[:take]
            data = data[take:]
            if len(held) == piece:
                out.write(held)
                held = bytearray()
        while len(data) >= piece:
            out.write(data[:piece])
            data = data[piece:]
        held += data
    if held:
        out.write(held)
    if written != size:
        raise ValueError(f"{name}: {written} bytes made where the archive holds {size}")
    return crc


def _tail(layout: _Layout, start: int, crcs: dict[str, int]) -> memoryview:
    """The archive from `start` (after the last storage) to its end: the records torch writes
    last, then the central directory, with the storages' CRCs and the serialization id."""
    image = _Sparse(layout.pieces)
    with zipfile.ZipFile(image) as zf:
        infos, start_dir = zf.infolist(), zf.start_dir
    record_crcs = [crcs.get(i.filename.split("/", 1)[-1], i.CRC) for i in infos]
    ids = [k for k, i in enumerate(infos) if i.filename.endswith("/" + _SERIALIZATION_ID)]
    if len(ids) != 1:
        raise ValueError("torch.save wrote no serialization id: a torch this module does not know")
    id_index, id_info = ids[0], infos[ids[0]]
    folded = 0
    for k, crc in enumerate(record_crcs):
        if k != id_index and infos[k].file_size:  # torch folds no CRC for an empty record
            folded = _hash_combine(folded, crc)
    image.seek(id_info.header_offset + 26)
    name_len, extra_len = struct.unpack("<HH", image.read(4))
    id_at = id_info.header_offset + 30 + name_len + extra_len
    image.seek(id_at)
    new_id = image.read(id_info.file_size)[:20] + f"{folded:020d}".encode()
    record_crcs[id_index] = zlib_ng.crc32(new_id)
    patches = {id_at: new_id,
               id_at + len(new_id) + 4: struct.pack("<I", record_crcs[id_index])}
    at = start_dir
    for info, crc in zip(infos, record_crcs, strict=True):
        patches[at + _CENTRAL_CRC] = struct.pack("<I", crc)
        at += 46 + len(info.filename.encode()) + len(info.extra) + len(info.comment)
    image.seek(start)
    tail = bytearray(image.read())
    for offset, value in patches.items():
        tail[offset - start:offset - start + len(value)] = value
    return memoryview(tail)
