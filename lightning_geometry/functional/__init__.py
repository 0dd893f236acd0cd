"""Pure-PyTorch geometry of the loss landscape: no Lightning import, every number tested against a reference.

Each function takes ``(model, loss_fn, batches)``: ``loss_fn(model, batch) -> scalar Tensor`` and one batch or an
iterable of batches, whose size-weighted mean loss is measured. The model is left exactly as it was found.
"""

from lightning_geometry.functional.closure import LossClosure, LossFn, measurement
from lightning_geometry.functional.connectivity import (
    BezierCurve,
    PathResult,
    apply_permutation,
    bezier_barrier,
    fit_bezier,
    interpolation_barrier,
    permutation_spec,
    reestimate_bn,
    weight_matching,
)
from lightning_geometry.functional.curvature import (
    DirectionalCurvatureResult,
    EigenResult,
    TraceResult,
    directional_curvature,
    hessian_trace,
    lanczos,
    top_hessian_eigenvalues,
)
from lightning_geometry.functional.hessian import HessianOperator, dense_hessian, hessian_operator
from lightning_geometry.functional.index import GeometryDescriptors, GeometryIndexResult, geometry_index
from lightning_geometry.functional.params import (
    ParamDict,
    filter_normalized_direction,
    flatten_params,
    make_generator,
    normalize_direction,
    param_axpy,
    param_dot,
    param_norm,
    random_direction,
    unflatten_params,
)
from lightning_geometry.functional.sharpness import (
    SharpnessResult,
    average_adaptive_sharpness,
    epsilon_sharpness,
    sgd_stability_threshold,
    stability_ratio,
    stability_threshold,
    worst_case_sharpness,
)
from lightning_geometry.functional.surface import (
    AreaFraction,
    ContourWidth,
    LossSurface,
    area_fraction,
    contour_width,
    loss_along_line,
    loss_plane,
    random_directions,
)
from lightning_geometry.functional.trajectory import (
    RandomProjection,
    TrajectoryStep,
    TrajectoryTracker,
    jl_distortion,
    jl_sketch_dim,
    pca_projection,
)
from lightning_geometry.functional.trend import TheilSenResult, relative_slope, theil_sen

__all__ = [
    # loss closure
    "LossClosure",
    "LossFn",
    "measurement",
    # parameter dictionaries and directions
    "ParamDict",
    "filter_normalized_direction",
    "flatten_params",
    "make_generator",
    "normalize_direction",
    "param_axpy",
    "param_dot",
    "param_norm",
    "random_direction",
    "unflatten_params",
    # Hessian products and curvature
    "HessianOperator",
    "dense_hessian",
    "hessian_operator",
    "DirectionalCurvatureResult",
    "EigenResult",
    "TraceResult",
    "directional_curvature",
    "hessian_trace",
    "lanczos",
    "top_hessian_eigenvalues",
    # sharpness
    "SharpnessResult",
    "average_adaptive_sharpness",
    "epsilon_sharpness",
    "sgd_stability_threshold",
    "stability_ratio",
    "stability_threshold",
    "worst_case_sharpness",
    # surfaces and contour width
    "AreaFraction",
    "ContourWidth",
    "LossSurface",
    "area_fraction",
    "contour_width",
    "loss_along_line",
    "loss_plane",
    "random_directions",
    # connectivity
    "BezierCurve",
    "PathResult",
    "apply_permutation",
    "bezier_barrier",
    "fit_bezier",
    "interpolation_barrier",
    "permutation_spec",
    "reestimate_bn",
    "weight_matching",
    # trajectory
    "RandomProjection",
    "TrajectoryStep",
    "TrajectoryTracker",
    "jl_distortion",
    "jl_sketch_dim",
    "pca_projection",
    # trends and the geometry index
    "TheilSenResult",
    "relative_slope",
    "theil_sen",
    "GeometryDescriptors",
    "GeometryIndexResult",
    "geometry_index",
]
