"""Where an experiment's data and pruned models come from: the user's files, or the demo's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dlrm_sparsity.checkpoints import sha256_of_file
from dlrm_sparsity.criteo.npy import is_npy_data
from dlrm_sparsity.demo import ensure_demo, ensure_processed
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.runner.distributed import DistContext
from dlrm_sparsity.runner.outputs import METADATA_CSV


@dataclass(frozen=True)
class Inputs:
    raw: str | None  # None with torchrec's .npy files, which need no raw file
    processed: str
    metadata: Path
    demo_model: Path | None  # the demo's model when neither data nor metadata was given


def resolve_inputs(raw_data_file: str | None, processed_data_file: str | None,
                   metadata: str | None, output_dir: Path, skip_bad_lines: bool,
                   ctx: DistContext) -> Inputs:
    """The data files (the demo's, made if missing, when none are given) and the metadata CSV.

    Rank 0 builds a missing processed file from the raw one; the others wait for it.
    """
    metadata_path = Path(metadata) if metadata else output_dir / METADATA_CSV
    if processed_data_file is not None and is_npy_data(processed_data_file):
        return Inputs(raw_data_file, processed_data_file, metadata_path, None)
    if (raw_data_file is None) != (processed_data_file is None):
        raise UserInputError("give both --raw_data_file and --processed_data_file "
                             "(or neither, for the demo; torchrec's .npy files need no raw "
                             "file)")
    if raw_data_file is None:
        paths = ensure_demo()
        demo_model = paths.model if metadata is None else None
        return Inputs(str(paths.raw), str(paths.processed), metadata_path, demo_model)
    if ctx.is_main:
        ensure_processed(raw_data_file, processed_data_file, skip_bad_lines)
    ctx.barrier()
    return Inputs(raw_data_file, processed_data_file, metadata_path, None)


def checkpoint_sha256(meta: dict) -> str | None:
    """The sha256 the metadata records for a pruned model, or the file's own (the seed's
    metadata has none); None when the file is missing (its row then fails, naming it)."""
    recorded = meta.get("sha256")
    if isinstance(recorded, str) and recorded:
        return recorded
    path = Path(meta["checkpoint"])
    return sha256_of_file(path) if path.is_file() else None

