"""Training: the epoch loop and everything it steps.

Owns: the loop (`loop.fit`), one epoch of training and of validation (`engine`), recipes beside the
loop (accumulation, clipping, mixup/cutmix, EMA, warmup-cosine schedule: `recipes`), losses,
BatchNorm recalibration (`batchnorm`), precision and compile settings (`speed`), torchrun support
(`distributed`), seeding and random states (`seeding`), graceful stop (`signals`), what a run writes
as it goes (`recorder`: summary.txt, metrics.csv, TensorBoard) and resuming (`resume`).

May import: `imgcls.errors`, `imgcls.log`, `imgcls.checkpoint`, `imgcls.data`. Not `imgcls.evaluation`
(the final reports of a run are written by the train entry), not the entries.
"""
