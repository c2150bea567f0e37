"""Where the Hydra config tree is: `garden/conf` inside an installed wheel, else the repo's `conf/`."""

from __future__ import annotations

from pathlib import Path

_PACKAGED = Path(__file__).resolve().parent / "conf"
_REPOSITORY = Path(__file__).resolve().parents[2] / "conf"


def config_dir() -> Path:
    for candidate in (_PACKAGED, _REPOSITORY):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"garden's config tree is missing (looked in {_PACKAGED} and {_REPOSITORY})")
