"""``python -m lightning_geometry``: the same as the ``lightning-geometry`` command."""

from lightning_geometry.cli import main

if __name__ == "__main__":
    main()
