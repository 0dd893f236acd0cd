"""Lightning callbacks that measure loss-landscape geometry during and after training (thin adapters over
:mod:`lightning_geometry.functional`)."""

from lightning_geometry.callbacks._after_fit import AfterFitCallback
from lightning_geometry.callbacks._base import GeometryCallback, GeometryConfigurationError, ProbeOutput
from lightning_geometry.callbacks.connectivity import ModeConnectivity, ModeConnectivityResult, classification_error
from lightning_geometry.callbacks.contour import EnergyContour, EnergyContourResult
from lightning_geometry.callbacks.curvature import CurvatureProbe
from lightning_geometry.callbacks.early_stopping import SharpnessEarlyStopping, SharpnessStoppingReason
from lightning_geometry.callbacks.index import GeometryIndex
from lightning_geometry.callbacks.trajectory import TrajectoryMonitor, TrajectoryResult

__all__ = [
    # live probes
    "CurvatureProbe",
    "TrajectoryMonitor",
    "TrajectoryResult",
    # after fit
    "EnergyContour",
    "EnergyContourResult",
    "ModeConnectivity",
    "ModeConnectivityResult",
    "classification_error",
    # the landscape geometry index
    "GeometryIndex",
    # stopping
    "SharpnessEarlyStopping",
    "SharpnessStoppingReason",
    # bases
    "AfterFitCallback",
    "GeometryCallback",
    "GeometryConfigurationError",
    "ProbeOutput",
]
