import pickle
import zipfile
import zlib

import numpy as np
import pytest
import torch
from zlib_ng import zlib_ng

from dlrm_sparsity.checkpoints import (
    CheckpointTables,
    compressor_label,
    copy_zip_renamed,
    is_torch_archive,
    load_state_dict,
    member_name,
    save_state_dict_zip,
    sha256_of_file,
)
from dlrm_sparsity.errors import CheckpointError


def dlrm_layout(model):
    """What dlrm's --save-model writes, with its numpy scalars."""
    return {"epoch": 0, "iter": 10, "nepochs": 1, "nbatches": 10, "nbatches_test": 1,
            "train_loss": np.float32(0.45), "total_loss": np.float32(4.5),
            "opt_state_dict": {}, "test_acc": np.float64(0.789),
            "state_dict": model.state_dict()}


def assert_same(sd, model):
    ref = model.state_dict()
    assert list(sd) == list(ref)
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_dlrm_checkpoint_with_numpy_scalars_round_trips(tmp_path, tiny_model):
    path = tmp_path / "criteo.ckpt"
    torch.save(dlrm_layout(tiny_model), path)
    with pytest.raises(pickle.UnpicklingError, match="numpy"):  # why the allow-list exists
        torch.load(path, weights_only=True)
    assert_same(load_state_dict(path), tiny_model)


def test_bare_state_dict_and_disk_savings_zip_load(tmp_path, tiny_model):
    bare = tmp_path / "bare.pt"
    torch.save(tiny_model.state_dict(), bare)
    assert_same(load_state_dict(bare), tiny_model)
    zipped = tmp_path / "model.zip"
    size = save_state_dict_zip(tiny_model.state_dict(), zipped)
    assert size == zipped.stat().st_size
    with zipfile.ZipFile(zipped) as zf:
        assert [i.compress_type for i in zf.infolist()] == [zipfile.ZIP_DEFLATED]
    assert_same(load_state_dict(zipped), tiny_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.pt", "model.zip"]  # no unzip


def test_zip_of_a_dlrm_checkpoint_loads(tmp_path, tiny_model):
    ckpt = tmp_path / "m.ckpt"
    torch.save(dlrm_layout(tiny_model), ckpt)
    with zipfile.ZipFile(tmp_path / "m.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(ckpt, "m.ckpt")
    assert_same(load_state_dict(tmp_path / "m.zip"), tiny_model)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_unsafe_pickle_is_refused_naming_the_global(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="global '(builtins.)?print'"):
        load_state_dict(path)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "checkpoint file not found"),
    (lambda p: p.write_text("hello, not a checkpoint\n"), "not a readable PyTorch checkpoint"),
    (lambda p: zipfile.ZipFile(p, "w").close(), "holds no checkpoint"),
    (lambda p: _zip_with(p, {"a.txt": b"x", "b.txt": b"y"}), "no single checkpoint"),
    (lambda p: _zip_with(p, {"notes.txt": b"just text"}), "not a readable PyTorch checkpoint"),
    (lambda p: torch.save({"epoch": 3}, p), "no state dict inside"),
    (lambda p: torch.save({"state_dict": {"w": torch.zeros(1), "a": 1}}, p),
     "entry 'a' is not a tensor"),
])
def test_bad_checkpoints_get_one_clear_error(tmp_path, make, message):
    path = tmp_path / "model.zip"
    make(path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_state_dict(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_zip_is_reported(tmp_path, tiny_model):
    path = tmp_path / "model.zip"
    save_state_dict_zip(tiny_model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        load_state_dict(path)


def test_failed_save_leaves_nothing_under_the_final_name(tmp_path):
    path = tmp_path / "model.zip"
    with pytest.raises((AttributeError, pickle.PicklingError), match="pickle"):
        save_state_dict_zip({"bad": lambda: 0}, path)
    assert list(tmp_path.iterdir()) == []


def test_sha256_of_file(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_of_file(tmp_path / "f") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


def _zip_with(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def test_tables_are_read_one_at_a_time_as_private_copies(tmp_path, tiny_model):
    path = tmp_path / "criteo.ckpt"
    torch.save(dlrm_layout(tiny_model), path)
    assert is_torch_archive(path)
    tables = CheckpointTables(path)
    ref = tiny_model.state_dict()
    first = tables.read("emb_l.0.weight")
    assert torch.equal(first, ref["emb_l.0.weight"])
    first.zero_()  # a copy: the file and later reads are untouched
    assert torch.equal(tables.read("emb_l.0.weight"), ref["emb_l.0.weight"])
    assert torch.equal(load_state_dict(path, mmap=True)["emb_l.1.weight"],
                       ref["emb_l.1.weight"])
    torch.save(dlrm_layout(tiny_model), path)  # rewritten: another mtime
    with pytest.raises(CheckpointError, match="changed during the run"):
        tables.read("emb_l.0.weight")


def test_only_plain_torch_files_count_as_archives(tmp_path, tiny_model):
    zipped = tmp_path / "model.zip"
    save_state_dict_zip(tiny_model.state_dict(), zipped)
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    assert not is_torch_archive(zipped)
    assert not is_torch_archive(tmp_path / "text.ckpt")
    assert not is_torch_archive(tmp_path / "missing.ckpt")


def _deflated_size(module, data: bytes) -> int:
    deflate = module.compressobj(6, module.DEFLATED, -15)  # raw deflate, as zipfile's
    return len(deflate.compress(data) + deflate.flush())


def test_each_compressor_deflates_the_torch_save_bytes_into_a_standard_zip(tmp_path):
    generator = torch.Generator().manual_seed(0)
    sd = {"emb_l.0.weight": torch.randn(4000, 16, generator=generator)}
    sd["emb_l.0.weight"][:, :8] = 0  # half pruned
    written = {}
    for compressor in ("zlib", "zlib-ng"):
        path = tmp_path / f"{compressor}.zip"
        assert save_state_dict_zip(sd, path, compressor=compressor) == path.stat().st_size
        with zipfile.ZipFile(path) as zf:  # the standard library reads either
            assert zf.testzip() is None  # every CRC checks out
            written[compressor] = zf.getinfo(member_name(path)).compress_size
            payload = zf.read(member_name(path))
        assert torch.equal(load_state_dict(path)["emb_l.0.weight"], sd["emb_l.0.weight"])
    by_zlib, by_zlib_ng = _deflated_size(zlib, payload), _deflated_size(zlib_ng, payload)
    assert abs(by_zlib - by_zlib_ng) > 100  # the two deflates tell apart on this input
    assert written["zlib"] == by_zlib  # zipfile's own deflate, the seed's
    # zlib-ng's stream depends by a byte or so on how torch.save hands it the input
    assert abs(written["zlib-ng"] - by_zlib_ng) <= 8
    assert compressor_label("zlib") == f"zlib {zlib.ZLIB_RUNTIME_VERSION}"
    assert compressor_label("zlib-ng").startswith("zlib-ng 2.")
    with pytest.raises(ValueError, match="unknown compressor"):
        save_state_dict_zip(sd, tmp_path / "x.zip", compressor="zstd")
    assert not (tmp_path / "x.zip").exists()


def test_zip_member_is_named_as_the_seed_loads_it(tmp_path, tiny_model):
    """The seed's metrics script extracts a zip's member, then loads <zip stem>.ckpt."""
    path = tmp_path / "criteo_model_norm=L1_sl=0.5.zip"
    save_state_dict_zip(tiny_model.state_dict(), path)
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist() == ["criteo_model_norm=L1_sl=0.5.ckpt"]
        zf.extractall(tmp_path / "seed")
    extracted = torch.load(tmp_path / "seed" / f"{path.stem}.ckpt", weights_only=True)
    assert_same(extracted, tiny_model)


def test_a_copied_zip_is_renamed_without_deflating_again(tmp_path, tiny_model):
    first = tmp_path / "L1" / "criteo_model_norm=L1_sl=0.zip"
    first.parent.mkdir()
    save_state_dict_zip(tiny_model.state_dict(), first)
    copy = tmp_path / "criteo_model_norm=L2_sl=0.zip"
    assert copy_zip_renamed(first, copy) == first.stat().st_size
    with zipfile.ZipFile(copy) as zf, zipfile.ZipFile(first) as zf_first:
        assert zf.namelist() == ["criteo_model_norm=L2_sl=0.ckpt"]
        assert zf.testzip() is None  # the CRC covers the data, not the name
        assert zf.infolist()[0].CRC == zf_first.infolist()[0].CRC
    assert_same(load_state_dict(copy), tiny_model)
    with pytest.raises(ValueError, match="cannot be renamed in place"):
        copy_zip_renamed(first, tmp_path / "a_longer_name.zip")
