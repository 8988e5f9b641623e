"""The library under the suite's scripts.

    model.py, checkpoints.py       DLRM (dlrm's state-dict layout) and its files
    criteo/                        dlrm's processed data and test split, preprocessing,
                                   synthetic data
    training.py, demo.py           the seed's training recipe; the built-in demo
    evaluation.py                  scoring a split with scikit-learn's metrics
    inputs.py                      where an experiment's data and pruned models come from
    runner/                        the sweep every experiment runs on: resume, CSVs, torchrun, CLI
    plots.py, device.py, errors.py, lazy.py (pandas imported on first use)

Imports run one way: the scripts at the repository root import this package; nothing here
imports a root file, and runner/ knows rows and items, not DLRM.
"""
