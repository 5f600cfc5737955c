"""`python -m imgcls.sweep <sweep_dir>` (and the `imgcls-sweep` script): rebuild a sweep's leaderboard."""

import sys

from imgcls.cli import run_command
from imgcls.sweeps.summary import main


def cli() -> None:
    """The `imgcls-sweep` console script: a path, not a config, so no Hydra command line."""
    sys.exit(run_command(None, main))


if __name__ == "__main__":
    cli()
