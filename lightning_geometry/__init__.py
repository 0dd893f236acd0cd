"""lightning_geometry: loss-landscape geometry for PyTorch Lightning, measured while a model trains.

``lightning_geometry.functional`` holds the pure-PyTorch measurements (no Lightning import);
the callbacks adapt them to a ``Trainer``.
"""

from lightning_geometry import functional

__version__ = "0.1.0"

__all__ = ["functional", "__version__"]
