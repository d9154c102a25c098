"""``python -m medlit.tracking sync [SPOOL] [--tracking_uri URI]``."""

from __future__ import annotations

import argparse
import logging
import sys

from medlit.errors import run_main
from medlit.tracking.spool import sync_spool


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m medlit.tracking",
        description="Deliver tracking calls that runs kept in a spool folder while their "
        "MLflow store was unreachable.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="deliver spooled calls")
    sync.add_argument("path", nargs="?", default="mlruns/spool")
    sync.add_argument("--tracking_uri", default=None, help="deliver here instead")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    n = sync_spool(args.path, args.tracking_uri)
    print(f"medlit.tracking: delivered {n} spooled tracking calls from {args.path}")


if __name__ == "__main__":
    sys.exit(run_main(main))
