"""archive.write_streamed against torch.save: the same bytes, with the tables made in chunks."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

from dlrm_sparsity.archive import storage_order, write_streamed
from dlrm_sparsity.checkpoints import load_state_dict, save_state_dict_zip


def saved(state_dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


def streamed(state_dict, names, rows_per_chunk) -> bytes:
    buffer = io.BytesIO()
    shapes = {k: v.to("meta") if k in names else v for k, v in state_dict.items()}
    write_streamed(shapes, buffer, {n: (lambda n=n: state_dict[n].split(rows_per_chunk))
                                    for n in names})
    return buffer.getvalue()


def model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"bot_l.0.weight": torch.randn(7, 3, generator=g),
            "emb_l.0.weight": torch.randn(1000, 16, generator=g),
            "bot_l.0.bias": torch.randn(5, generator=g),
            "emb_l.1.weight": torch.randn(333, 8, generator=g).to(torch.float16),
            "empty": torch.empty(0, 4),
            "emb_l.2.weight": torch.randn(1, 4, generator=g)}


@pytest.mark.parametrize("rows_per_chunk", [1, 97, 5000])
def test_the_bytes_are_torch_saves(rows_per_chunk):
    """Tables made in chunks of any size, an empty tensor, a half-precision table, a one-row
    table: byte for byte what torch.save writes, CRCs and serialization id included."""
    sd = model(rows_per_chunk)
    tables = [k for k in sd if k.startswith("emb")]
    ours = streamed(sd, tables, rows_per_chunk)
    assert ours == saved(sd)
    assert zipfile.ZipFile(io.BytesIO(ours)).testzip() is None  # every CRC checks out


def test_shared_storages_and_no_tables():
    """Two entries on one storage are written once, as torch.save writes them; with no
    tables to make the bytes are torch.save's too."""
    sd = model(0)
    sd["view"] = sd["bot_l.0.weight"][2:]
    assert storage_order(sd) == [k for k in sd if k != "view"]
    assert streamed(sd, ["emb_l.0.weight"], 64) == saved(sd)
    assert streamed(sd, [], 64) == saved(sd)
    empty = {"emb_l.0.weight": torch.empty(0, 4)}  # no bytes to stream at all
    assert streamed(empty, ["emb_l.0.weight"], 64) == saved(empty)


def test_chunks_that_do_not_add_up_are_refused():
    sd = model(1)
    with pytest.raises(ValueError, match="emb_l.0.weight: 6336 bytes made where the archive "
                                         "holds 64000"):
        write_streamed({k: v for k, v in sd.items()}, io.BytesIO(),
                       {"emb_l.0.weight": lambda: [sd["emb_l.0.weight"][:99]]})


def test_a_streamed_zip_is_the_zip_of_the_whole_model(tmp_path):
    """save_state_dict_zip with tables made as written: the same zip file, to the byte."""
    sd = model(2)
    tables = {k: (lambda k=k: sd[k].split(10)) for k in sd if k.startswith("emb")}
    whole = save_state_dict_zip(sd, tmp_path / "m.zip")
    first = (tmp_path / "m.zip").read_bytes()
    (tmp_path / "m.zip").unlink()
    shapes = {k: v.to("meta") if k in tables else v for k, v in sd.items()}
    assert save_state_dict_zip(shapes, tmp_path / "m.zip", tables=tables) == whole
    assert (tmp_path / "m.zip").read_bytes() == first
    back = load_state_dict(tmp_path / "m.zip")
    assert all(torch.equal(back[k], sd[k]) for k in sd)
