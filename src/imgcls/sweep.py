"""`python -m imgcls.sweep <sweep_dir>` (and the `imgcls-sweep` script): rebuild a sweep's leaderboard."""

import sys

from imgcls.sweeps.summary import main


def cli() -> None:
    """The `imgcls-sweep` console script."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
