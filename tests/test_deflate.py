"""Deflate across threads: one standard stream, read back by the stdlib, near one thread's size."""

import io
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from zlib_ng import zlib_ng

from dlrm_sparsity.checkpoints import load_state_dict, member_name, save_state_dict_zip
from dlrm_sparsity.deflate import WINDOW, ParallelDeflate

CHUNK = 64 * 1024


def pruned_bytes(rows: int, seed: int = 0) -> bytes:
    rows = max(rows, 10)
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, 16, generator=g)
    table[torch.rand(rows, 16, generator=g) < 0.7] = 0.0
    table[::5] = table[1::5]  # repeats far apart: matches that reach across the cuts
    return table.numpy().tobytes()


def deflate_in_writes(module, data: bytes, write: int, threads: int = 3) -> bytes:
    p = ParallelDeflate(module, 6, threads, chunk=CHUNK)
    out = [p.compress(data[i:i + write]) for i in range(0, len(data), write)]
    return b"".join(out) + p.flush()


@pytest.mark.parametrize("module", [zlib, zlib_ng], ids=["zlib", "zlib-ng"])
@pytest.mark.parametrize("size", [0, 100, CHUNK, 3 * CHUNK, 5 * CHUNK + 12345])
@pytest.mark.parametrize("write", [1000, 7 * CHUNK + 1])
def test_the_stdlib_inflates_what_the_threads_deflate(module, size, write):
    data = pruned_bytes(1 + size // 64)[:size]
    assert zlib.decompress(deflate_in_writes(module, data, write), -15) == data


def test_the_stream_is_within_a_tenth_of_a_percent_of_one_thread():
    data = pruned_bytes(150_000)  # 9.2 MB, 140 chunks of 64 KiB
    one = zlib_ng.compressobj(6, zlib_ng.DEFLATED, -15)
    single = one.compress(data) + one.flush()
    threaded = deflate_in_writes(zlib_ng, data, 1 << 20)
    assert abs(len(threaded) / len(single) - 1) < 1e-3


def test_streams_deflated_side_by_side_on_one_shared_pool_are_each_their_own_stream():
    data = [pruned_bytes(20_000, seed) for seed in range(3)]  # 1.2 MB each, 19 chunks
    alone = [deflate_in_writes(zlib_ng, d, 100_000, threads=2) for d in data]
    with ThreadPoolExecutor(3) as writers:  # three zips written at once, as by the workers
        together = list(writers.map(lambda d: deflate_in_writes(zlib_ng, d, 100_000, 2), data))
    assert together == alone
    assert [zlib.decompress(s, -15) for s in together] == data


def test_chunks_shorter_than_the_window_are_refused():
    with pytest.raises(ValueError, match="at least"):
        ParallelDeflate(zlib, 6, 2, chunk=WINDOW - 1)


@pytest.mark.parametrize("compressor", ["zlib", "zlib-ng"])
def test_a_zip_deflated_on_threads_passes_the_stdlib_crc_check(tmp_path, compressor):
    g = torch.Generator().manual_seed(1)
    sd = {"emb_l.0.weight": torch.randn(300_000, 16, generator=g), "bias": torch.arange(7.0)}
    path = tmp_path / "model.zip"
    size = save_state_dict_zip(sd, path, 6, compressor, threads=4)
    assert size == path.stat().st_size
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # every member inflated and its CRC-32 checked
        raw = zf.read(member_name(path))
        assert zf.getinfo(member_name(path)).CRC == zlib.crc32(raw)  # the stdlib's own CRC
    loaded = torch.load(io.BytesIO(raw), weights_only=True)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert all(torch.equal(load_state_dict(path)[k], sd[k]) for k in sd)
