"""``lightning-geometry`` (also ``python -m lightning_geometry``): run the studies from the command line.

``lightning-geometry table1`` fits the paper's Table 1 configurations and the learning-rate sweep on digits with
seeds, measures their geometry and writes ``report.md`` and ``results.json`` (see
:mod:`lightning_geometry.study.table1`).
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Sequence

from lightning_geometry.study.configs import LR_SWEEP, TABLE1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-geometry", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    table1 = commands.add_parser("table1", help="reproduce the paper's Table 1 on digits and validate the index")
    names = [c.name for c in TABLE1 + LR_SWEEP]
    table1.add_argument("--configs", nargs="+", choices=names, default=names, metavar="NAME",
                        help=f"configurations to run (default: all of {', '.join(names)})")
    table1.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3; >= 2 for barriers)")
    table1.add_argument("--epochs", type=int, default=60, help="training epochs per run (default 60)")
    table1.add_argument("--out", default="results/table1", help="output directory (default results/table1)")
    table1.add_argument("--quick", action="store_true", help="a smoke run: Table 1 only, 2 seeds, 5 epochs")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-geometry`` command."""
    args = _parser().parse_args(argv)
    if args.seeds < 1 or args.epochs < 1:
        raise SystemExit(f"--seeds and --epochs must be at least 1, got {args.seeds} and {args.epochs}")
    from lightning_geometry.study.table1 import run_study

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    by_name = {c.name: c for c in TABLE1 + LR_SWEEP}
    configs = [by_name[n] for n in args.configs]
    seeds, epochs = range(args.seeds), args.epochs
    if args.quick:
        configs, seeds, epochs = list(TABLE1), range(2), 5
    result = run_study(configs, seeds=tuple(seeds), epochs=epochs, out_dir=args.out)
    print()
    print(result.markdown)
