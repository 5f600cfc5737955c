"""Training: the run builder, the epoch loop and everything it steps.

Owns: building a run for every command (`run.build_run`: device, precision, memory format, model,
data and loaders (`run_data`); optimizer, schedule, loss and recipe when training), the loop (`loop.fit`), one
epoch of training and of validation (`engine`), recipes beside the loop (accumulation, clipping,
mixup/cutmix, EMA, warmup-cosine schedule: `recipes`), losses, BatchNorm recalibration
(`batchnorm`), precision and compile settings (`speed`), torchrun support (`distributed`), seeding
and random states (`seeding`), graceful stop (`signals`), what a run writes as it goes (`recorder`:
summary.txt, metrics.csv, TensorBoard, and through `imgcls.pages` curves.png and report.html) and resuming (`resume`: the training state, and
`resume_into`, which puts a checkpoint's state back into a built run).

May import: `imgcls.errors`, `imgcls.log`, `imgcls.checkpoint`, `imgcls.models`, `imgcls.data`,
`imgcls.config` (the one place config nodes become objects), `imgcls.pages`. Not `imgcls.evaluation` (the final
reports of a run are written by the train entry), not the entries.
"""
