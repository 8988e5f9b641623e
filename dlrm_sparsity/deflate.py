"""Deflate on several cores into one standard stream, as pigz does.

zipfile deflates a member through a compressor object (`compress(data)`, then `flush()`), on
one core. ParallelDeflate is such an object: it cuts the input into chunks and deflates them on
a thread pool (zlib and zlib-ng release the GIL while they deflate). Each chunk's compressor
is primed with the 32 KiB of input before the chunk (deflate's whole window, so matches may
reach back across the cut as in one stream) and ends with a full flush, which closes its last
block on a byte boundary without marking it final; the last chunk ends the stream. The chunks'
outputs, concatenated in order, are one raw deflate stream any inflater reads; zipfile computes
the CRC-32 of the input itself. The stream differs from one-thread deflate only in a few bytes
per chunk (the flush markers, and blocks cut where the chunks are), which the disk benchmark
measures.

The threads belong to one pool per process (shared_pool), shared by every zip being written:
while one zip's writer is between zips (hashing the last one, waiting for the next pruned
model) or has few chunks left, the other zips' chunks keep every thread busy, where a pool per
zip would leave its threads idle.

No library offers this: zlib and zlib-ng deflate on one thread; pigz is a program, not a
Python module, and would need the whole checkpoint written out first.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

WINDOW = 32 * 1024  # deflate's largest match distance
CHUNK = 4 * 1024 * 1024  # pigz uses 128 KiB; larger chunks lose less at the cuts


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(threads: int) -> ThreadPoolExecutor:
    """The process's pool of `threads` deflate threads, made on first use."""
    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="deflate")
        return _POOLS[threads]


class ParallelDeflate:
    """A raw deflate (wbits -15) compressor object for zipfile, deflating on `threads`: the
    process's shared pool of that many threads, unless `shared` is False (a pool of its own,
    shut down by flush)."""

    def __init__(self, zlib_module, level: int, threads: int, chunk: int = CHUNK,
                 shared: bool = True):
        if chunk < WINDOW:
            raise ValueError(f"chunks of at least {WINDOW} bytes (the deflate window)")
        self.zlib, self.level, self.chunk = zlib_module, level, chunk
        threads = max(1, threads)
        self.shared = shared
        self.pool = (shared_pool(threads) if shared
                     else ThreadPoolExecutor(threads, thread_name_prefix="deflate"))
        self.in_flight = 2 * threads  # chunks held at once: bounded memory
        self.pending: deque[Future] = deque()
        self.buffer = bytearray()
        self.window = b""  # the WINDOW bytes of input before the buffered chunk

    def _deflate(self, data: bytes, primer: bytes, last: bool) -> bytes:
        z = self.zlib
        c = (z.compressobj(self.level, z.DEFLATED, -15, 8, z.Z_DEFAULT_STRATEGY, primer)
             if primer else z.compressobj(self.level, z.DEFLATED, -15))
        return c.compress(data) + c.flush(z.Z_FINISH if last else z.Z_FULL_FLUSH)

    def _submit(self, data: bytes, last: bool) -> None:
        self.pending.append(self.pool.submit(self._deflate, data, self.window, last))
        self.window = (self.window + data)[-WINDOW:] if len(data) < WINDOW else data[-WINDOW:]

    def _ready(self, wait_for: int) -> bytes:
        """The finished head of the queue, in order, after waiting until at most wait_for
        chunks are still in flight."""
        out = []
        while self.pending and (len(self.pending) > wait_for or self.pending[0].done()):
            out.append(self.pending.popleft().result())
        return b"".join(out)

    def compress(self, data) -> bytes:
        view = memoryview(data).cast("B")
        start = 0
        out = []
        while len(self.buffer) + len(view) - start >= self.chunk:
            take = self.chunk - len(self.buffer)
            # one copy into the chunk (the caller may reuse its buffer once this returns)
            self._submit(b"".join((self.buffer, view[start:start + take])), last=False)
            start += take
            self.buffer.clear()
            out.append(self._ready(self.in_flight))
        self.buffer += view[start:]
        out.append(self._ready(self.in_flight))
        return b"".join(out)

    def flush(self) -> bytes:
        """The rest of the stream, ended (a final empty block when the input ended on a cut)."""
        self._submit(bytes(self.buffer), last=True)
        self.buffer.clear()
        try:
            return self._ready(0)
        finally:
            if not self.shared:
                self.pool.shutdown()
