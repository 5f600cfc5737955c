"""What a config may be and how it becomes objects.

Owns: the registry of targets each config group may build (`targets`), the one place where config
nodes are instantiated (`build`), the Hydra callback that checks a run before anything is written
and claims its directory (`preflight`), run-directory naming (`naming`), values computed from
other keys (`rules`: the learning rate for the batch),
overrides applied to a saved run's config (`overrides`), and the old names of project targets in configs saved by
earlier layouts (`renamed`).

May import: `imgcls.errors`, `imgcls.log`, `imgcls.cli` (the config directory), and `imgcls.data` for
the normalization a transform pipeline ends with. Nothing here trains or evaluates.
"""
