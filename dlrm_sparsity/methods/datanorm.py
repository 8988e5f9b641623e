"""The seed's DataNormSparsifier points on the front: read from experiment 4's CSV.

Experiments 1 to 4 prune, zip, score and store every grid point; this adds nothing but the
names. A lossless format of a pruned model is `datanorm`; the quantized formats are
`datanorm+int8` and `datanorm+int4` (row_pruned_int8/int4 hold only the non-zero rows, int8/int4
every row); each pruned model is kept in the smallest format of each (the one it would be
served in). The zip is experiment 1's (the pruned checkpoint). Levels 0 and 1 are left out, as
for the other methods: level 0 is the unpruned model the others start from, level 1 has no
tables left.
"""

from __future__ import annotations

import pandas as pd

from dlrm_sparsity.runner.outputs import KEY_COLUMNS

METHOD_OF_FORMAT = {"dense": "datanorm", "coo": "datanorm", "csr": "datanorm",
                    "csr_int64": "datanorm", "row_pruned": "datanorm",
                    "int8": "datanorm+int8", "row_pruned_int8": "datanorm+int8",
                    "int4": "datanorm+int4", "row_pruned_int4": "datanorm+int4"}
KEPT = ["bytes", "bytes_ratio", "roc_auc", "lookup_ratio", "lookup_ratio_low",
        "lookup_ratio_high", "lookup_ratio_verdict", "lookup_median_s", "machine_noise_p90",
        "machine_noise_worst", "disturbed"]


def datanorm_rows(memory: pd.DataFrame, metadata: pd.DataFrame, methods: list[str]
                  ) -> pd.DataFrame:
    """Experiment 4's scored rows of the asked datanorm methods, named for the front, with
    experiment 1's zip size."""
    if "format" not in memory or "roc_auc" not in memory:
        return memory.iloc[:0]
    # levels 0 and 1 are left out, as for the other methods: the unpruned model, no tables
    inside = (memory["sparsity_level"] > 0) & (memory["sparsity_level"] < 1)
    df = memory[memory["roc_auc"].notna() & memory["bytes"].notna() & inside].copy()
    df["method"] = df["format"].map(METHOD_OF_FORMAT)
    df = df[df["method"].isin(methods)]
    # each pruned model in its smallest format of each method: the one it would be served in
    df = df.sort_values("bytes", kind="stable").drop_duplicates(KEY_COLUMNS + ["method"])
    df["level"] = df["sparsity_level"]
    df["setting"] = [f"{r['norm']} {r['sparse_block_shape']} level {r['sparsity_level']:g}, "
                     f"{r['format']}" for r in df.to_dict("records")]
    zips = metadata[KEY_COLUMNS + ["zip_file_size_bytes"]] if "zip_file_size_bytes" in \
        metadata else metadata[KEY_COLUMNS].assign(zip_file_size_bytes=float("nan"))
    df = df.merge(zips, on=KEY_COLUMNS, how="left")
    return df[["method", "setting", "level", *KEY_COLUMNS, "format",
               *[c for c in KEPT if c in df], "zip_file_size_bytes"]]
