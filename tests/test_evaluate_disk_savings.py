import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch

import evaluate_disk_savings
from conftest import run_script
from dlrm_sparsity import disk, pruning
from dlrm_sparsity.checkpoints import load_state_dict, save_state_dict_zip, sha256_of_file
from dlrm_sparsity.runner.outputs import METADATA_COLUMNS, read_metadata
from sparse_utils import GridPoint, sparsify_embeddings

REPO = Path(__file__).resolve().parent.parent
GRID = ["--sparsity-levels", "0.0", "0.5", "1.0", "--norms", "L1", "L2",
        "--block-shapes", "1x1", "1x4"]


@pytest.fixture(scope="module")
def run(tiny_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("disk")
    code = run_script(evaluate_disk_savings, ["--model-path", tiny_pipeline["model"],
                                              "--output-dir", out, "--device", "cpu",
                                              "--workers", "2", *GRID])
    return code, out, pd.read_csv(out / "sparse_model_metadata.csv")


def test_csv_has_the_seed_columns_then_more_and_one_row_per_point(run, capsys):
    code, out, df = run
    assert code == 0
    assert list(df.columns[:6]) == METADATA_COLUMNS
    assert {"zip_file_size_bytes", "actual_sparsity", "compression_ratio", "sha256",
            "device", "torch_version"} <= set(df.columns)
    assert set(df["workers"]) == {2} and df["compressor"].str.startswith("zlib-ng ").all()
    # two workers prune side by side on the CPU, each step on half of torch's threads
    assert set(df["num_threads"]) == {max(1, torch.get_num_threads() // 2)}
    assert len(df) == 9  # 3 levels x (L1 1x1, L1 1x4, L2 1x4): L2 1x1 is skipped
    assert set(df["sparse_block_shape"]) == {"(1, 1)", "(1, 4)"}
    assert (out / "disk_savings.png").stat().st_size > 0


def test_sizes_and_hashes_match_the_files_and_paths_are_relative(run):
    _, out, df = run
    for row in df.to_dict("records"):
        path = out / row["path"]
        assert not row["path"].startswith("/")
        assert path.stat().st_size == row["zip_file_size_bytes"]
        assert row["zip_file_size"] == pytest.approx(row["zip_file_size_bytes"] / 2**20)
        assert sha256_of_file(path) == row["sha256"]
        with zipfile.ZipFile(path) as zf:
            assert [i.compress_type for i in zf.infolist()] == [zipfile.ZIP_DEFLATED]


def test_each_zip_holds_the_stock_sparsifiers_weights(run, tiny_pipeline):
    _, out, df = run
    source = load_state_dict(tiny_pipeline["model"])
    for row in df.to_dict("records"):
        shape = tuple(int(x) for x in row["sparse_block_shape"].strip("()").split(","))
        expected = sparsify_embeddings(source, GridPoint(row["norm"], shape,
                                                         row["sparsity_level"]),
                                       torch.device("cpu")).weights
        written = load_state_dict(out / row["path"])
        assert all(torch.equal(written[k], expected[k]) for k in expected)
        if row["sparsity_level"] == 1.0:
            assert row["actual_sparsity"] == 1.0
            assert all(torch.equal(written[k], source[k]) for k in source if "emb_l" not in k)


def test_moved_output_folder_still_resolves_its_paths(run, tmp_path):
    _, out, _ = run
    moved = shutil.copytree(out, tmp_path / "elsewhere")
    meta = read_metadata(moved / "sparse_model_metadata.csv")
    for checkpoint in meta["checkpoint"]:
        assert str(checkpoint).startswith(str(moved))
        load_state_dict(checkpoint)


def test_rerun_resumes_and_redoes_a_damaged_zip(run, tiny_pipeline, capsys):
    _, out, df = run
    first = out / df["path"][4]
    first.write_bytes(first.read_bytes()[:100])
    capsys.readouterr()
    code = run_script(evaluate_disk_savings, ["--model-path", tiny_pipeline["model"],
                                              "--output-dir", out, "--device", "cpu",
                                              "--workers", "2", *GRID])
    assert code == 0
    assert "kept 8 finished item(s)" in capsys.readouterr().out
    again = pd.read_csv(out / "sparse_model_metadata.csv")
    assert list(again["sha256"]) == list(df["sha256"])  # deterministic zips
    assert not list(out.glob(".*progress*"))


@pytest.mark.parametrize("flags, message", [
    (["--sparsity-levels", "1.5"], "sparsity level 1.5 is outside [0, 1]"),
    (["--norms", "L3"], "unknown norm 'L3'"),
    (["--block-shapes", "0x4"], "block shape '0x4'"),
    (["--model-path", "missing.ckpt"], "missing.ckpt: checkpoint file not found"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_pipeline, tmp_path, capsys,
                                                         flags, message):
    args = ["--model-path", tiny_pipeline["model"], "--output-dir", tmp_path / "out", *flags]
    assert run_script(evaluate_disk_savings, args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "sparse_model_metadata.csv").exists()
    assert not list((tmp_path / "out").rglob("*.zip")) if (tmp_path / "out").exists() else True


def test_dump_path_that_cannot_be_created(tiny_pipeline, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    args = ["--model-path", tiny_pipeline["model"], "--output-dir", tmp_path,
            "--sparsified-model-dump-path", tmp_path / "a_file" / "dump"]
    assert run_script(evaluate_disk_savings, args) == 2
    assert "cannot create the dump folder" in capsys.readouterr().err


def test_positive_zeros_keep_the_model_and_shrink_the_zip(run, tiny_pipeline, tmp_path):
    _, out, df = run
    args = ["--model-path", tiny_pipeline["model"], "--output-dir", tmp_path, "--device", "cpu",
            "--sparsity-levels", "1.0", "--norms", "L1", "--block-shapes", "1x4"]
    assert run_script(evaluate_disk_savings, [*args, "--positive-zeros"]) == 0
    positive = pd.read_csv(tmp_path / "sparse_model_metadata.csv").iloc[0]
    signed = df[(df.sparsity_level == 1.0) & (df.norm == "L1") &
                (df.sparse_block_shape == "(1, 4)")].iloc[0]
    a, b = load_state_dict(tmp_path / positive["path"]), load_state_dict(out / signed["path"])
    assert all(torch.equal(a[k], b[k]) for k in a)  # -0.0 == 0.0: the same model
    assert any(torch.signbit(b[k]).any() for k in b if k.startswith("emb_l"))
    assert not any(torch.signbit(a[k]).any() for k in a if k.startswith("emb_l"))
    assert positive["zip_file_size_bytes"] < signed["zip_file_size_bytes"]
    assert run_script(evaluate_disk_savings, args) == 0  # the flag changed: not resumed
    assert pd.read_csv(tmp_path / "sparse_model_metadata.csv")["sha256"][0] == signed["sha256"]


def test_without_workers_tables_are_read_from_the_file_and_write_the_same_zips(
        run, tiny_pipeline, tmp_path):
    """With --workers 0 the originals stay in the file, and one point is pruned at a time:
    the same bytes out as two workers pruning side by side in memory."""
    _, out, df = run
    mapped = load_state_dict(tiny_pipeline["model"], mmap=True)
    held = pruning.hold_model(mapped, tiny_pipeline["model"], 0)
    tables = held.state_dict
    assert {v.device.type for k, v in tables.items() if "emb_l" in k} == {"meta"}
    assert {v.device.type for k, v in tables.items() if "emb_l" not in k} == {"cpu"}
    assert pruning.hold_model(mapped, tiny_pipeline["model"], 1).read_table is None
    zipped = tmp_path / "model.zip"  # a zip cannot be mapped: held in memory
    save_state_dict_zip(mapped, zipped)
    assert pruning.hold_model(load_state_dict(zipped), zipped, 0).read_table is None
    args = ["--model-path", tiny_pipeline["model"], "--output-dir", tmp_path, "--device", "cpu",
            "--workers", "0", *GRID]
    assert run_script(evaluate_disk_savings, args) == 0
    lean = pd.read_csv(tmp_path / "sparse_model_metadata.csv")
    assert list(lean["sha256"]) == list(df["sha256"])
    assert list(lean["actual_sparsity"]) == list(df["actual_sparsity"])


def test_default_workers_keep_a_large_model_to_one_point_unless_cores_and_ram_allow_more():
    gib = 2**30
    workers = disk.default_workers
    assert workers(gib // 2, cpus=2, ram_bytes=24 * gib) == 2  # small: min(4, CPUs)
    assert workers(gib // 2, cpus=64, ram_bytes=24 * gib) == 4
    kaggle = int(2.16 * gib)
    assert workers(kaggle, cpus=2, ram_bytes=24 * gib) == 0  # memory first on a small machine
    assert workers(kaggle, cpus=4, ram_bytes=128 * gib) == 0
    assert workers(kaggle, cpus=8, ram_bytes=128 * gib) == 2
    assert workers(kaggle, cpus=16, ram_bytes=128 * gib) == 2
    assert workers(kaggle, cpus=48, ram_bytes=512 * gib) == 3  # one per 16 CPUs beyond 32
    assert workers(kaggle, cpus=128, ram_bytes=512 * gib) == 4  # at most 4
    assert workers(kaggle, cpus=16, ram_bytes=12 * gib) == 1  # (1 + 1) x 2 copies fit, 3 do not
    assert workers(kaggle, cpus=16, ram_bytes=0) == 0  # RAM unknown
    assert workers(gib // 2, cpus=2, ram_bytes=0) == 2
    assert workers(gib // 2, cpus=4, ram_bytes=gib // 4) == 0  # larger than its memory


def test_the_stock_checks_budget_is_a_quarter_of_the_model_and_an_eighth_of_the_memory():
    mib = 2**20
    assert disk.check_budget(16 * 1024 * mib, 0) == 4096 * mib
    assert disk.check_budget(100 * mib, 0) == 256 * mib  # the floor
    assert disk.check_budget(16 * 1024 * mib, 4096 * mib) == 512 * mib  # the memory's eighth


def test_the_memory_a_process_may_use_is_its_cgroups_limit_where_lower(monkeypatch, tmp_path):
    monkeypatch.setattr(disk, "cgroup_memory_limit", lambda: 2**20)
    assert disk.physical_memory() == 2**20
    monkeypatch.setattr(disk, "cgroup_memory_limit", lambda: 0)
    assert disk.physical_memory() > 2**20


def test_pruning_on_the_calling_thread_as_on_a_gpu_writes_the_same_zips(
        run, tiny_pipeline, tmp_path, monkeypatch):
    """The GPU's arrangement (the calling thread prunes, two workers zip), here on the CPU."""
    _, out, df = run
    calls = []
    monkeypatch.setattr(disk, "prunes_on_workers",
                        lambda device, workers: calls.append((device.type, workers)) or False)
    args = ["--model-path", tiny_pipeline["model"], "--output-dir", tmp_path, "--device", "cpu",
            "--workers", "2", *GRID]
    assert run_script(evaluate_disk_savings, args) == 0
    assert calls == [("cpu", 2)]
    here = pd.read_csv(tmp_path / "sparse_model_metadata.csv")
    assert list(here["sha256"]) == list(df["sha256"])
    # level 0.0 prunes nothing in any config: one zip made, copied for the two others
    level0 = here[here.sparsity_level == 0.0]
    assert level0["copied_from"].isna().sum() == 1 and level0["mask_time_sec"].notna().sum() == 1
    crcs = {zipfile.ZipFile(tmp_path / p).infolist()[0].CRC for p in level0["path"]}
    assert len(crcs) == 1


def test_a_point_whose_zip_cannot_be_written_is_an_error_row_and_the_rest_finish(
        tiny_pipeline, tmp_path, capsys):
    blocked = (tmp_path / "sparsified_models" / "L1" / "config_1x4" /
               "criteo_model_norm=L1_sl=0.5.zip")
    blocked.mkdir(parents=True)  # a folder where the zip must go: the rename fails
    args = ["--model-path", tiny_pipeline["model"], "--output-dir", tmp_path, "--device", "cpu",
            "--workers", "2", *GRID]
    assert run_script(evaluate_disk_savings, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "IsADirectoryError" in err[0]
    df = pd.read_csv(tmp_path / "sparse_model_metadata.csv")
    failed = df[df["error"].notna()]
    assert len(df) == 9 and len(failed) == 1
    assert failed.iloc[0][["norm", "sparse_block_shape", "sparsity_level"]].tolist() == \
        ["L1", "(1, 4)", 0.5]
    assert df[df["error"].isna()]["sha256"].notna().all()
    blocked.rmdir()
    assert run_script(evaluate_disk_savings, args) == 0  # a rerun redoes only that point
    assert "kept 8 finished item(s)" in capsys.readouterr().out  # 4 pruned, 4 copied


def test_zips_deflated_on_threads_hold_the_same_weights(run, tiny_pipeline, tmp_path):
    _, out, df = run
    args = ["--model-path", tiny_pipeline["model"], "--output-dir", tmp_path, "--device", "cpu",
            "--deflate-threads", "2", *GRID]
    assert run_script(evaluate_disk_savings, args) == 0
    here = pd.read_csv(tmp_path / "sparse_model_metadata.csv")
    assert set(here["deflate_threads"]) == {2} and set(df["deflate_threads"]) == {1}
    for mine, theirs in zip(here["path"], df["path"], strict=True):
        with zipfile.ZipFile(tmp_path / mine) as zf:
            assert zf.testzip() is None
        a, b = load_state_dict(tmp_path / mine), load_state_dict(out / theirs)
        assert all(torch.equal(a[k], b[k]) for k in b)


def hold_folder(folder) -> subprocess.Popen:
    """Another process inside a session on folder, as any script's run holds it."""
    code = ("import sys, time\nfrom dlrm_sparsity.runner.session import Session\n"
            "with Session(['evaluate_disk_savings.py', '--other'], sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_into_a_folder_in_use_is_refused_in_one_line_naming_the_first(
        tiny_pipeline, tmp_path, capsys):
    stale = tmp_path / ".sparse_model_metadata.csv.0123456789ab.tmp"
    holder = hold_folder(tmp_path)
    try:
        stale.write_text("the holder's temporary")
        args = ["--model-path", tiny_pipeline["model"], "--output-dir", tmp_path,
                "--device", "cpu", *GRID]
        assert run_script(evaluate_disk_savings, args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {holder.pid} on " in err[0]
        assert "another run is writing there" in err[0] and "--other" in err[0]
        assert stale.exists() and not (tmp_path / "sparse_model_metadata.csv").exists()
    finally:
        holder.kill()  # killed: the system gives its lock up with it
        holder.wait()
    assert run_script(evaluate_disk_savings, args) == 0
    assert not stale.exists()  # cleared by the lock's new holder
    assert "error" not in pd.read_csv(tmp_path / "sparse_model_metadata.csv")


def test_a_dump_folder_outside_the_output_folder_is_locked_too(tiny_pipeline, tmp_path,
                                                                capsys):
    dump = tmp_path / "zips"
    dump.mkdir()
    holder = hold_folder(dump)
    try:
        args = ["--model-path", tiny_pipeline["model"], "--output-dir", tmp_path / "out",
                "--sparsified-model-dump-path", dump, "--device", "cpu", *GRID]
        assert run_script(evaluate_disk_savings, args) == 2
        assert f"{dump}: another run is writing there (pid {holder.pid}" in \
            capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
