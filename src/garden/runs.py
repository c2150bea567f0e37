"""`python -m garden.runs cleanup`: end as KILLED the MLflow runs left RUNNING by a garden process that
died without ending them (`kill -9`, the OOM killer, a lost node), in every experiment of the store.

Every garden run does the same for its own experiment when it starts; this command is for a store no run
will touch again. Only runs written from this host can be judged (by their recorded pid and start time).
"""

from __future__ import annotations

import argparse
import logging
import os

from mlflow.tracking import MlflowClient

from garden.tracking import end_dead_runs
from garden.validation import check_tracking_store

DEFAULT_URI = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")


def cleanup(uri: str) -> list[str]:
    check_tracking_store(uri)
    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return end_dead_runs(client, experiments) if experiments else []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m garden.runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["cleanup"])
    parser.add_argument("--tracking-uri", default=DEFAULT_URI, help=f"MLflow store (default: {DEFAULT_URI})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ended = cleanup(args.tracking_uri)
    print(f"ended {len(ended)} run(s) as KILLED" + (f": {', '.join(ended)}" if ended else ""))


if __name__ == "__main__":
    main()
