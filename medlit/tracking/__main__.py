"""``python -m medlit.tracking sync [SPOOL] [--tracking_uri URI]`` and
``python -m medlit.tracking runs [--experiment X] [--sort METRIC] [--limit N]``."""

from __future__ import annotations

import argparse
import logging
import sys

from medlit.errors import exit_process, run_main
from medlit.tracking.runs import runs_report
from medlit.tracking.spool import sync_spool
from medlit.tracking.store import DEFAULT_TRACKING_URI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m medlit.tracking",
        description="List a tracking store's runs (runs), or deliver tracking calls that "
        "runs kept in a spool folder while their MLflow store was unreachable (sync).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="deliver spooled calls")
    sync.add_argument("path", nargs="?", default="mlruns/spool")
    sync.add_argument("--tracking_uri", default=None, help="deliver here instead")
    runs = sub.add_parser(
        "runs",
        help="the runs as a table",
        description="Each experiment's runs as a table, the experiment with the newest run "
        "first: name, status (DEAD: RUNNING in MLflow, its process gone), start, duration, "
        "the params that differ between the listed runs, the monitored validation "
        "metric's best value over the run (e.g. 'max val/dice_mean') and the test metrics. "
        "The table fits the terminal (COLUMNS; 100 in a pipe), leaving out the least "
        "important columns and naming them.",
    )
    runs.add_argument(
        "--experiment", default=None, help="only this experiment (name or id); default: all"
    )
    runs.add_argument(
        "--sort",
        default=None,
        metavar="METRIC",
        help="order by a metric, best first: a validation metric by its best value over the "
        "run, in its monitor's mode (else lower first for losses and distances); a test "
        "metric by its value. --sort=-METRIC: highest first, --sort=+METRIC: lowest first. "
        "Default: newest first",
    )
    runs.add_argument(
        "--limit", type=int, default=20, help="runs per experiment, after sorting (0: all)"
    )
    runs.add_argument(
        "--tracking_uri", default=DEFAULT_TRACKING_URI, help=f"default: {DEFAULT_TRACKING_URI}"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "runs":
        print(runs_report(args.tracking_uri, args.experiment, args.sort, args.limit))
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    n = sync_spool(args.path, args.tracking_uri)
    print(f"medlit.tracking: delivered {n} spooled tracking calls from {args.path}")


if __name__ == "__main__":
    exit_process(run_main(main))
