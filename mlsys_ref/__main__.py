"""Command line: ``python -m mlsys_ref info`` and ``python -m mlsys_ref tour [--only AREA] [--device cpu|cuda]``."""

from __future__ import annotations

import argparse
import sys

from mlsys_ref import backend
from mlsys_ref.tour import AREAS, run_tour


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlsys_ref", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device and backend")
    tour = commands.add_parser("tour", help="every technique at small sizes, checked against its reference")
    tour.add_argument("--only", choices=AREAS, help="run one area only")
    tour.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if present, else cpu")
    arguments = parser.parse_args(argv)
    if arguments.command == "info":
        rows = backend.info()
        width = max(map(len, rows))
        for key, value in rows.items():
            print(f"{key.ljust(width)}  {value}")
        return 0
    return run_tour(only=arguments.only, device=arguments.device)


if __name__ == "__main__":
    sys.exit(main())
