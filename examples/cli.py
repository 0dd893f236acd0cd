"""LightningCLI entry point: the geometry callbacks are added from YAML with ``class_path`` / ``init_args``.

Run from the repository root::

    python examples/cli.py fit --config examples/live_geometry.yaml

Callbacks can also be appended on the command line::

    python examples/cli.py fit --config examples/live_geometry.yaml \
        --trainer.callbacks+=lightning_geometry.callbacks.CurvatureProbe --trainer.callbacks.every_n_epochs=2
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # so that `live_geometry` imports from YAML

from live_geometry import DigitsClassifier, DigitsDataModule  # noqa: E402


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(DigitsClassifier, DigitsDataModule, args=args, run=run, seed_everything_default=0)


if __name__ == "__main__":
    main()
