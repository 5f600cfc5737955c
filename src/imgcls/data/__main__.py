"""`python -m imgcls.data check data=... data.root=...`: the pre-training data check, alone."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from imgcls.cli import run_command
from imgcls.config.build import build_data
from imgcls.errors import DataError

USAGE = "usage: python -m imgcls.data check [data=<option>] [data.<key>=<value> ...]"


def check(cfg: DictConfig) -> None:
    """Print the report; raise (exit 2) when training would refuse this tree, return (exit 0) otherwise."""
    data = build_data(cfg.data)
    report, _ = data.inspect()  # a UserError here stopped before the scan (no root, no train/)
    print(report.text())
    if report.errors:  # listed in the report: stderr only says what they mean
        raise DataError(
            f"{len(report.errors)} problem(s) in {data.root} (listed above); training would stop before it starts"
        )


def main() -> None:
    """`imgcls-data check ...`: the verb, then Hydra's command line of conf/check.yaml."""
    if len(sys.argv) < 2 or sys.argv[1] != "check":
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    run_command("check", check, sys.argv[2:], prog=f"{sys.argv[0]} check")


if __name__ == "__main__":
    main()
