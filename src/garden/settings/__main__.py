"""`python -m garden.settings yaml|docs [--root DIR]`: write conf/settings.yaml or docs/settings.md from
the schema (`make settings` writes both)."""

from __future__ import annotations

import argparse
from pathlib import Path

from garden.settings.render import write


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m garden.settings", description=__doc__)
    parser.add_argument("what", choices=["yaml", "docs"])
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository root")
    args = parser.parse_args(argv)
    print(f"wrote {write(args.what, args.root)}")


if __name__ == "__main__":
    main()
