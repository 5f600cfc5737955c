"""Sweeps: what is written around Hydra's multirun.

Owns: the leaderboard, objective plot and TensorBoard HParams of a sweep (`summary`), the
cross-validation table of swept folds (`crossval`), one GPU per parallel job (`gpu_slots`) and, with
tracking=mlflow, ending the sweep's MLflow parent run with the leaderboard (`tracking`). The
sweepers themselves (grid, resumable Optuna) are Hydra plugins in `hydra_plugins.imgcls_sweepers`.

May import: `imgcls.errors`, `imgcls.log`, `imgcls.tracking`, `imgcls.training.recorder` (reading a
job's metrics). Never the entries: a sweep runs `imgcls.train` through Hydra.
"""
