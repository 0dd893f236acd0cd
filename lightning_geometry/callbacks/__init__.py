"""Lightning callbacks that measure loss-landscape geometry during training (thin adapters over ``functional``)."""

from lightning_geometry.callbacks._base import GeometryCallback, GeometryConfigurationError, ProbeOutput
from lightning_geometry.callbacks.curvature import CurvatureProbe
from lightning_geometry.callbacks.trajectory import TrajectoryMonitor, TrajectoryResult

__all__ = [
    "CurvatureProbe",
    "GeometryCallback",
    "GeometryConfigurationError",
    "ProbeOutput",
    "TrajectoryMonitor",
    "TrajectoryResult",
]
