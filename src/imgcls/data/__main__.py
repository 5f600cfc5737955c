"""`python -m imgcls.data check data=... data.root=...`: the pre-training data check, alone."""

from __future__ import annotations

import sys
from typing import NoReturn

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from imgcls.cli import CONFIG_DIR
from imgcls.errors import UserError

USAGE = "usage: python -m imgcls.data check [data=<option>] [data.<key>=<value> ...]"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="check")
def check(cfg: DictConfig) -> None:
    """Print the report; exit 2 when training would refuse this tree, 0 otherwise."""
    from imgcls.config.build import build_data

    try:
        data = build_data(cfg.data)
    except MissingMandatoryValue as exc:
        fail(f"{exc.full_key} is required: set it on the command line, {exc.full_key}=...")
    except (UserError, OmegaConfBaseException) as exc:
        fail(str(exc))
    try:
        report, _ = data.inspect()
    except UserError as exc:  # stopped before the scan (no root, no train/): nothing to report
        fail(str(exc))
    print(report.text())
    if report.errors:  # listed in the report: stderr only says what they mean
        fail(
            f"{len(report.errors)} problem(s) in {data.root} (listed above); training would stop before it starts"
        )


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] != "check":
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"{sys.argv[0]} check", *sys.argv[2:]]  # Hydra reads the rest as overrides
    check()


if __name__ == "__main__":
    main()
