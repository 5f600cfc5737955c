"""imgcls: train and evaluate image classifiers with PyTorch, configured and swept with Hydra.

Where things live:
- the commands, each a thin entry: `train`, `evaluate`, `predict`, `export`, `lr_find`, `sweep`
  (`python -m imgcls.<command>`), sharing `cli` (the config directory and the entry helper);
- `config/`: what a config may build (the target registry), building it, run-directory naming, and
  the checks before a run writes anything;
- `data/`: the ImageFolder scan and data check, decoding, splits, caching, seeded loaders, digits;
- `training/`: the epoch loop (`training/loop.py`), one epoch (`training/engine.py`), recipes,
  precision, torchrun, seeding, resume and what a run records;
- `evaluation/`: per-sample inference, metrics, reports (`evaluation/reports.py`), figures, ensembles;
- `deploy/`: the export formats, written and read back;
- `sweeps/`: leaderboards and cross-validation around Hydra's multirun;
- `pages/`: training curves and the report.html of a run, an evaluation and a sweep;
- `models/`: the classifiers a config builds: `torchvision`'s, `timm`'s (with the `timm` extra) and
  `pretrained_input` (the input a timm model's pretrained weights expect);
- beside them: `checkpoint` (the checkpoint format), `runs` (a finished run read back), `tracking`
  (MLflow, for tracking=mlflow), `errors` and `log`.

Lower layers never import higher ones: errors/log/checkpoint/tracking, pages < config, models, data <
training < evaluation, deploy, sweeps < the entries.
"""

__version__ = "0.1.0"
