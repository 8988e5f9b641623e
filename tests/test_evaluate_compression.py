"""Experiment 6: every compression method on the unpruned model, one front; TorchRec's own
inference path scores the same; what cannot apply is a skipped row."""

import pandas as pd
import pytest
import torch

import evaluate_compression as comp
import evaluate_disk_savings
import evaluate_memory_savings
from conftest import run_script
from dlrm_sparsity.checkpoints import load_dlrm_state_dict
from dlrm_sparsity.criteo import counts
from dlrm_sparsity.criteo.data import load_split
from dlrm_sparsity.evaluation import quality_metrics, score_split
from dlrm_sparsity.formats import fbgemm_available
from dlrm_sparsity.methods import DATANORM, DEFAULT_METHODS
from dlrm_sparsity.methods.rows import RowNorm
from dlrm_sparsity.model import DLRMNet
from dlrm_sparsity.variants import FormatTables

pytestmark = pytest.mark.skipif(not fbgemm_available(), reason="needs fbgemm-gpu(-cpu)")


@pytest.fixture(scope="module")
def run(tiny_pipeline, wide_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("compression")
    assert run_script(evaluate_disk_savings, [
        "--model-path", wide_model, "--output-dir", out, "--device", "cpu",
        "--sparsity-levels", "0.0", "0.5", "0.9", "--norms", "L1", "--block-shapes", "1x4"]) == 0
    args = ["--raw-data-file", tiny_pipeline["raw"], "--processed-data-file",
            tiny_pipeline["processed"], "--output-dir", out, "--device", "cpu",
            "--batch-size", "128", "--min-run-time", "0.005", "--threads", "1"]
    assert run_script(evaluate_memory_savings, args) == 0
    code = run_script(comp, [*args, "--svd-ranks", "2", "17"])
    return code, out, args, pd.read_csv(out / "compression_front.csv")


def test_every_method_has_its_rows_keyed_by_method_and_setting(run):
    code, out, _, df = run
    assert code == 0 and (out / "compression_front.png").exists()
    assert set(df["method"]) == {"dense", *DEFAULT_METHODS}
    assert not df.duplicated(["method", "setting"]).any()
    leveled = df[df["method"].isin(["row_norm", "row_freq", "row_norm+int8", "svd"])]
    assert set(leveled.dropna(subset=["level"])["level"]) == {0.5, 0.9}  # 0 and 1 left out
    dense = df[df["method"] == "dense"].iloc[0]
    assert dense["bytes_ratio"] == 1.0 and dense["auc_drop"] == 0.0
    made = df[~df["method"].isin(DATANORM) & df["skipped"].isna()]
    assert made["roc_auc"].notna().all() and (made["zip_file_size_bytes"] > 0).all()
    assert (df["auc_drop"] - (dense["roc_auc"] - df["roc_auc"])).abs().max() < 1e-12


def test_the_datanorm_points_are_experiment_4s_in_their_smallest_format(run):
    _, out, _, df = run
    memory = pd.read_csv(out / "sparse_model_memory.csv")
    for method, formats in {"datanorm": ["dense", "coo", "csr", "csr_int64", "row_pruned"],
                            "datanorm+int8": ["int8", "row_pruned_int8"],
                            "datanorm+int4": ["int4", "row_pruned_int4"]}.items():
        ours = df[df["method"] == method].set_index("level")
        assert sorted(ours.index) == [0.5, 0.9]
        for level, row in ours.iterrows():
            held = memory[(memory["sparsity_level"] == level) & memory["format"].isin(formats)
                          & memory["roc_auc"].notna()]
            best = held.loc[held["bytes"].idxmin()]
            assert row["bytes"] == best["bytes"] and row["roc_auc"] == best["roc_auc"]
            assert row["setting"].endswith(best["format"])


def test_what_cannot_apply_is_a_skipped_row_that_says_why(run):
    code, _, _, df = run
    svd = df[df["method"] == "svd"].set_index("setting")
    assert code == 0 and svd.loc["rank 17", "skipped"] == "svd: rank 17 is above table 0's width 16"
    assert pd.isna(svd.loc["rank 17", "roc_auc"]) and svd.loc["rank 2", "rank"] == 2


def test_timed_settings_have_a_lookup_ratio_with_its_interval(run):
    _, _, _, df = run
    timed = df[df["timed"].eq(True)]
    assert set(timed["method"]) == set(DEFAULT_METHODS) - set(DATANORM)
    assert (timed["lookup_ratio_low"] <= timed["lookup_ratio"]).all()
    assert (timed["lookup_ratio"] <= timed["lookup_ratio_high"]).all()
    assert timed["machine_noise_p90"].notna().all()


class TorchRecServed:
    """A row-pruned INT8 model's tables through TorchRec's inference path: an EBC whose kept
    rows come first, set_pruning_data with the kept counts, quantize_inference_model; ids
    remapped before the module and pruned ones dropped from the KeyedJaggedTensor."""

    def __init__(self, tables, kept):
        from torch import nn
        from torchrec.inference.modules import quantize_inference_model, set_pruning_data
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        holder = nn.Module()
        holder.ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name=f"t{k}", embedding_dim=t.shape[1], num_embeddings=t.shape[0],
            feature_names=[f"f{k}"]) for k, t in enumerate(tables)], device=torch.device("cpu"))
        self.remaps = []
        with torch.no_grad():
            for k, (t, rows) in enumerate(zip(tables, kept, strict=True)):
                rows = torch.arange(t.shape[0]) if rows is None else rows
                rest = torch.ones(t.shape[0], dtype=torch.bool)
                rest[rows] = False
                holder.ebc.embedding_bags[f"t{k}"].weight.copy_(torch.cat([t[rows], t[rest]]))
                remap = torch.full((t.shape[0],), -1, dtype=torch.long)
                remap[rows] = torch.arange(len(rows))
                self.remaps.append(remap)
        set_pruning_data(holder, {f"t{k}": len(r) if r is not None else t.shape[0]
                                  for k, (t, r) in enumerate(zip(tables, kept, strict=True))})
        self.ebc = quantize_inference_model(holder).ebc
        self.keys = [f"f{k}" for k in range(len(tables))]

    def embed(self, offsets, indices):
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        values, lengths = [], []
        for k, remap in enumerate(self.remaps):  # one id per bag
            ids = remap[indices[k]]
            values.append(ids[ids >= 0])
            lengths.append((ids >= 0).long())
        out = self.ebc(KeyedJaggedTensor.from_lengths_sync(
            keys=self.keys, values=torch.cat(values), lengths=torch.cat(lengths)))
        return [out[key] for key in self.keys]


def test_torchrecs_inference_path_scores_the_suites_row_pruned_int8_row(run, tiny_pipeline,
                                                                         wide_model):
    _, _, _, df = run
    model = DLRMNet.from_state_dict(load_dlrm_state_dict(wide_model)).eval()
    tables = [bag.weight.detach() for bag in model.emb_l]
    served = TorchRecServed(tables, [RowNorm().kept(t, 0.5) for t in tables])
    test = load_split(tiny_pipeline["processed"], tiny_pipeline["raw"], "test")
    scores = score_split(FormatTables(model, served, "torchrec"), test, 128)
    auc = quality_metrics(test.labels.numpy(), scores)["roc_auc"]
    row = df[(df["method"] == "row_norm+int8") & (df["level"] == 0.5)].iloc[0]
    assert abs(auc - row["roc_auc"]) <= 1e-9


def test_a_rerun_keeps_every_row_and_rereads_the_datanorm_points(run, capsys):
    _, out, args, df = run
    assert run_script(comp, [*args, "--svd-ranks", "2", "17"]) == 0
    assert "resumed: kept" in capsys.readouterr().out
    again = pd.read_csv(out / "compression_front.csv")
    keys = ["method", "setting", "bytes", "roc_auc"]
    pd.testing.assert_frame_equal(again[keys], df[keys])


def test_frequency_pruning_without_training_days_is_skipped_with_one_line(run, monkeypatch,
                                                                          tmp_path, capsys):
    from dlrm_sparsity.errors import DataError

    _, out, args, _ = run

    def no_training_days(*_):
        raise DataError("data: one day only, so no training days to count ids over")
    monkeypatch.setattr(counts, "training_counts", no_training_days)
    args = [*args[:4], "--output-dir", tmp_path, *args[6:],
            "--sparse-model-metadata", out / "sparse_model_metadata.csv"]
    assert run_script(comp, [*args, "--methods", "row_freq", "int8"]) == 0
    df = pd.read_csv(tmp_path / "compression_front.csv").set_index("method")
    assert (df.loc["row_freq", "skipped"] == "row_freq: data: one day only, so no training "
                                             "days to count ids over").all()
    assert pd.notna(df.loc["int8", "roc_auc"])
    assert "skipped row_freq level 0.5: row_freq: data: one day only" in capsys.readouterr().out


def test_an_unknown_method_is_one_line_and_exit_2(run, capsys):
    _, _, args, _ = run
    assert run_script(comp, [*args, "--methods", "row_norm+int3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --methods: unknown method 'row_norm+int3'") and "\n" not in err
