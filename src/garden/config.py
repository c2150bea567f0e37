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


def discard_unused_output_dir() -> None:
    """Remove this Hydra job's output folder when the job wrote nothing there (it failed on bad input
    before any work): Hydra makes the folder and its `.hydra/` record before the job runs, and a failed
    invocation should not leave an empty `outputs/<model>/<time>/` behind. The error was printed."""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    folder = Path(HydraConfig.get().runtime.output_dir)
    hydra_files = {".hydra", f"{HydraConfig.get().job.name}.log"}
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= hydra_files:
        shutil.rmtree(folder, ignore_errors=True)
        if folder.parent.parent.name == "outputs":  # the default layout: outputs/<model>/<time>/
            for parent in (folder.parent, folder.parent.parent):  # each removed only when now empty
                try:
                    parent.rmdir()
                except OSError:
                    break
