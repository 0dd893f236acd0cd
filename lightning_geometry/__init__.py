"""lightning_geometry: loss-landscape geometry for PyTorch Lightning, measured while a model trains.

``lightning_geometry.functional`` holds the pure-PyTorch measurements (importing it does not import Lightning);
the callbacks (``lightning_geometry.CurvatureProbe`` …, defined in ``lightning_geometry.callbacks``) adapt them
to a ``Trainer``; ``lightning_geometry.study`` runs many fits (the paper's Table 1). The callbacks are loaded on
first access, so that the functional core stays usable without Lightning's import cost.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_geometry import functional

__version__ = "0.1.0"

_CALLBACKS = (
    "CurvatureProbe",
    "EnergyContour",
    "GeometryIndex",
    "ModeConnectivity",
    "SharpnessEarlyStopping",
    "TrajectoryMonitor",
)

__all__ = [*_CALLBACKS, "functional", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _CALLBACKS:
        return getattr(importlib.import_module("lightning_geometry.callbacks"), name)
    raise AttributeError(f"module 'lightning_geometry' has no attribute {name!r}")
