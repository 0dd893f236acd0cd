r"""The landscape geometry index: one score in [0, 1] from the descriptors the callbacks measure.

Each descriptor is mapped to a part in [0, 1], where 1 means flat, regular, wide and connected, by a monotone
rational transform with a documented reference scale :math:`s` (the value that maps to 0.5):

==============  ===================================================  ==============================  =========
part            descriptor                                           transform                        scale
==============  ===================================================  ==============================  =========
curvature       average adaptive sharpness :math:`a` (loss units,    :math:`1/(1 + a/s)`              0.001
                :math:`\rho = 0.05`), or, when it is missing, the
                stability ratio :math:`r = \lambda_{\max}/((2+2\beta)/\eta)`   :math:`1/(1 + r/s)`       0.5
continuity      displacement CV :math:`v` and mean turning cosine    :math:`\tfrac12\,[1/(1+v/s)`     0.5
                :math:`\bar c` between successive displacements      :math:`+ (1+\bar c)/2]`
width           mean contour width :math:`w` (filter-normalized      :math:`w/(w + s)`                0.5
                units, censored rays at the search radius)
connectivity    interpolation barrier :math:`b` (loss units)         :math:`1/(1 + \max(b,0)/s)`      0.1
==============  ===================================================  ==============================  =========

The index is the weighted arithmetic mean :math:`I = \sum_p w_p x_p / \sum_p w_p` of the parts, with default
weights curvature 1, continuity 0.5, width 1, connectivity 1.

Why these choices. Curvature enters scale-aware, never as raw :math:`\lambda_{\max}`: raw sharpness changes under
reparametrisation (Dinh et al. 2017) and tracks the learning rate more than generalisation (Andriushchenko et al.
2023). Adaptive sharpness (Kwon et al. 2021) is invariant to those rescalings and applies to every optimizer, so
it comes first; the stability ratio says where an SGD run sits against the edge of stability (Cohen et al. 2021)
and is the fallback. Rational transforms keep every part strictly inside (0, 1), so one extreme descriptor
cannot zero the index.

The defaults were set by the validation study (``lightning-geometry table1``: the paper's Table 1 and an SGD
learning-rate sweep on digits, 3 seeds each, 30 runs; numbers in the README). Over those runs the Spearman
correlation with test accuracy was +0.80 for contour width, +0.68 for connectivity, −0.72 for adaptive
sharpness, but +0.30 for the stability ratio (it follows the learning rate) and −0.58 for continuity (small
learning rates draw straight, regular paths and stop short of a good minimum). Hence adaptive sharpness first,
its scale at the values these runs show (1e-4 to 1e-2), and continuity at half weight: equal weights with the
stability ratio gave ρ = 0.57, these defaults 0.77. Thirty runs of one small dataset are a hypothesis, not a
law; refit the weights on your own runs with ``weights=``.

A missing descriptor is never silently skipped: :func:`geometry_index` returns ``value=None`` and names what is
missing, unless ``allow_partial=True`` asks explicitly for a score over the parts that exist.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

PARTS = ("curvature", "continuity", "width", "connectivity")

DEFAULT_SCALES: dict[str, float] = {
    "stability_ratio": 0.5,
    "adaptive_sharpness": 0.001,
    "displacement_cv": 0.5,
    "contour_width": 0.5,
    "barrier": 0.1,
}

DEFAULT_WEIGHTS: dict[str, float] = {"curvature": 1.0, "continuity": 0.5, "width": 1.0, "connectivity": 1.0}


@dataclass
class GeometryDescriptors:
    """What the callbacks measured for one run; ``None`` where a descriptor was not measured.

    Attributes:
        stability_ratio: :math:`\\lambda_{\\max}` over the optimizer's stability threshold (CurvatureProbe);
            the curvature part's fallback when adaptive sharpness is missing.
        adaptive_sharpness: Average adaptive sharpness at :math:`\\rho = 0.05` (CurvatureProbe), the curvature
            part's first choice.
        displacement_cv: Coefficient of variation of displacements over the window (TrajectoryMonitor).
        turning_cosine: Mean cosine between successive displacements (TrajectoryMonitor).
        contour_width: Mean contour width around the final weights (EnergyContour).
        barrier: Interpolation barrier to the reference model (ModeConnectivity).
    """

    stability_ratio: float | None = None
    adaptive_sharpness: float | None = None
    displacement_cv: float | None = None
    turning_cosine: float | None = None
    contour_width: float | None = None
    barrier: float | None = None


@dataclass
class GeometryIndexResult:
    """The index and its breakdown.

    Attributes:
        value: The weighted mean of the parts, or ``None`` when a part is missing (and partial scores were not
            asked for) or a descriptor is not finite.
        parts: Each available part in [0, 1] (nan for a non-finite descriptor).
        weights: The normalized weights used.
        missing: The parts that could not be computed, with the descriptor each needs.
    """

    value: float | None
    parts: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Validate index weights and return them normalized to sum to 1.

    Raises:
        ValueError: On an unknown part name, a negative or non-finite weight, or weights not summing to a
            positive number.
    """
    unknown = sorted(set(weights) - set(PARTS))
    if unknown:
        raise ValueError(f"weights has unknown parts {unknown}; the parts are {list(PARTS)}")
    for name, w in weights.items():
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{name!r}] must be a finite number >= 0, got {w!r}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {dict(weights)} (sum {total})")
    return {name: float(w) / total for name, w in weights.items() if w > 0}


def check_scales(scales: Mapping[str, float] | None) -> dict[str, float]:
    """Validate overrides of the reference scales and return them merged into :data:`DEFAULT_SCALES`.

    Raises:
        ValueError: On an unknown descriptor name or a scale that is not a positive finite number.
    """
    for name, value in (scales or {}).items():
        if name not in DEFAULT_SCALES:
            raise ValueError(f"scales has unknown descriptor {name!r}; known: {list(DEFAULT_SCALES)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"scales[{name!r}] must be a positive number, got {value!r}")
    return {**DEFAULT_SCALES, **(scales or {})}


def _decreasing(x: float, scale: float) -> float:
    return 1.0 / (1.0 + max(x, 0.0) / scale) if math.isfinite(x) else math.nan


def _parts(d: GeometryDescriptors, scales: Mapping[str, float]) -> tuple[dict[str, float], list[str]]:
    parts: dict[str, float] = {}
    missing: list[str] = []
    if d.adaptive_sharpness is not None:
        parts["curvature"] = _decreasing(d.adaptive_sharpness, scales["adaptive_sharpness"])
    elif d.stability_ratio is not None:
        parts["curvature"] = _decreasing(d.stability_ratio, scales["stability_ratio"])
    else:
        missing.append("curvature (adaptive_sharpness or stability_ratio)")
    if d.displacement_cv is not None and d.turning_cosine is not None:
        regularity = _decreasing(d.displacement_cv, scales["displacement_cv"])
        parts["continuity"] = 0.5 * (regularity + (1.0 + d.turning_cosine) / 2.0)
    else:
        missing.append("continuity (displacement_cv and turning_cosine)")
    if d.contour_width is not None:
        w = d.contour_width
        parts["width"] = w / (w + scales["contour_width"]) if math.isfinite(w) else math.nan
    else:
        missing.append("width (contour_width)")
    if d.barrier is not None:
        parts["connectivity"] = _decreasing(d.barrier, scales["barrier"])
    else:
        missing.append("connectivity (barrier)")
    return parts, missing


def geometry_index(
    descriptors: GeometryDescriptors,
    weights: Mapping[str, float] | None = None,
    scales: Mapping[str, float] | None = None,
    allow_partial: bool = False,
) -> GeometryIndexResult:
    """Combine the descriptors into the landscape geometry index (transforms in the module docstring).

    Args:
        descriptors: The measured descriptors.
        weights: Weight per part (``curvature``, ``continuity``, ``width``, ``connectivity``); parts left out
            weigh 0. Default: :data:`DEFAULT_WEIGHTS` (curvature 1, continuity 0.5, width 1, connectivity 1).
        scales: Override some reference scales of :data:`DEFAULT_SCALES`.
        allow_partial: Score over the available parts (renormalizing their weights) instead of returning
            ``value=None`` when a weighted part is missing.

    Returns:
        A :class:`GeometryIndexResult`; ``missing`` lists the weighted parts that could not be computed.

    Raises:
        ValueError: On bad weights (see :func:`check_weights`) or a non-positive scale.

    Example:
        >>> d = GeometryDescriptors(adaptive_sharpness=0.001, displacement_cv=0.5, turning_cosine=1.0,
        ...                         contour_width=0.5, barrier=0.1)
        >>> result = geometry_index(d)
        >>> result.parts["curvature"], result.parts["continuity"], round(result.value, 6)
        (0.5, 0.75, 0.535714)
    """
    normalized = check_weights(DEFAULT_WEIGHTS if weights is None else weights)
    parts, missing = _parts(descriptors, check_scales(scales))
    missing = [m for m in missing if m.split(" ")[0] in normalized]
    used = {p: w for p, w in normalized.items() if p in parts}
    if (missing and not allow_partial) or not used:
        return GeometryIndexResult(None, parts, normalized, missing)
    total = sum(used.values())
    value = sum(w * parts[p] for p, w in used.items()) / total
    return GeometryIndexResult(value if math.isfinite(value) else None, parts, {p: w / total for p, w in used.items()},
                         missing)
