"""`python -m imgcls.data check data=... data.root=...`: the pre-training data check, alone."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from imgcls.errors import UserError

CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "conf")
USAGE = "usage: python -m imgcls.data check [data=<option>] [data.<key>=<value> ...]"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="check")
def check(cfg: DictConfig) -> None:
    """Print the report; exit 2 when training would refuse this tree, 0 otherwise."""
    from imgcls.build import build_data

    try:
        data = build_data(cfg.data)
        try:
            data.setup()
        finally:
            if data.report.scanned:  # counts and warnings, also when there are errors
                print(data.report.text())
    except MissingMandatoryValue as exc:
        print(
            f"error: {exc.full_key} is required: set it on the command line, {exc.full_key}=...",
            file=sys.stderr,
        )
        sys.exit(2)
    except (UserError, OmegaConfBaseException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] != "check":
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"{sys.argv[0]} check", *sys.argv[2:]]  # Hydra reads the rest as overrides
    check()


if __name__ == "__main__":
    main()
