"""`python -m garden` / `garden`: parse the Hydra config and hand it to `garden.tasks.run`."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from garden.config import config_dir, discard_unused_output_dir
from garden.errors import GardenError


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> None:
    from garden.tasks import run  # imported late: `--help` and config errors stay fast
    from garden.tracking import Terminated

    try:
        run(cfg)
    except GardenError as err:
        discard_unused_output_dir()
        raise SystemExit(f"garden: error: {err}") from None
    except KeyboardInterrupt as err:
        # 128 + the signal's number, as shells report it; a rerun resumes from the caches.
        sigterm = isinstance(err, Terminated)
        print(f"garden: {'terminated (SIGTERM)' if sigterm else 'interrupted'}; an open MLflow run was "
              "ended KILLED; rerun to resume", file=sys.stderr)  # fmt: skip
        raise SystemExit(143 if sigterm else 130) from None


def cli() -> None:
    """The command: Hydra's app, then the end of a sweep's parent run when the sweep failed (Hydra does
    not call its callbacks' `on_multirun_end` then)."""
    from garden.tracking import end_open_sweep

    try:
        main()
    except BaseException as err:
        end_open_sweep(err)
        raise


if __name__ == "__main__":
    cli()
