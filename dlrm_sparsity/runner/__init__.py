"""The experiment runner: sweeps over items with resume, error rows, torchrun and atomic CSVs."""
