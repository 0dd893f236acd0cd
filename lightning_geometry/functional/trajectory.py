r"""Optimisation trajectories: displacement statistics, a Johnson–Lindenstrauss sketch, and a PCA projection.

A trajectory is a sequence of weight vectors :math:`\theta_0, \theta_1, \dots, \theta_T` (one per probe point).
:class:`TrajectoryTracker` computes, at each point :math:`t`,

.. math::
    \delta_t = \lVert \theta_t - \theta_{t-1} \rVert, \qquad
    D_t = \lVert \theta_t - \theta_0 \rVert, \qquad
    \ell_t = \sum_{s \le t} \delta_s, \qquad
    \rho_t = \ell_t / D_t \ge 1, \qquad
    c_t = \frac{\langle \theta_t - \theta_{t-1}, \theta_{t-1} - \theta_{t-2} \rangle}{\delta_t \, \delta_{t-1}},

the displacement (also relative to :math:`\lVert\theta_{t-1}\rVert`), the distance from the initial weights (the
net displacement, also relative to :math:`\lVert\theta_0\rVert`), the path length, the path/net ratio
(tortuosity: 1 for a straight path), the cosine between successive displacements (negative when the optimiser
oscillates across a valley, e.g. at the edge of stability, Cohen et al. 2021), the coefficient of variation
:math:`\mathrm{std}/\mathrm{mean}` of the last ``window`` displacements, and the displacement of every layer.
All of these are exact: the tracker keeps three full vectors (:math:`\theta_0`, :math:`\theta_{t-1}` and the
previous displacement), so its memory does not grow with the number of points.

For pictures of the whole path (:func:`pca_projection`) each point is also kept as a random projection
:math:`y_t = R(\theta_t - \theta_0)`, :math:`R \in \mathbb{R}^{m \times d}` with i.i.d. :math:`N(0, 1/m)`
entries drawn from a private generator, in a preallocated buffer of at most ``max_points`` rows (when it fills,
every other stored point is dropped and the stride doubles), so the memory is fixed whatever the number of
epochs. By the Johnson–Lindenstrauss lemma in the form of Dasgupta & Gupta (2003), for any fixed :math:`x`

.. math::
    \Pr\big[\,\lvert \lVert R x \rVert^2 - \lVert x \rVert^2 \rvert > \varepsilon \lVert x \rVert^2\big]
    \le 2 \exp\!\big(-\tfrac{m}{2} (\varepsilon^2/2 - \varepsilon^3/3)\big),

so with :math:`n` points, all :math:`n(n-1)/2` squared pairwise distances are preserved within a factor
:math:`1 \pm \varepsilon` with probability at least :math:`1-\delta` as soon as
:math:`m \ge 2 \ln(n(n-1)/\delta) / (\varepsilon^2/2 - \varepsilon^3/3)` (:func:`jl_sketch_dim`;
:func:`jl_distortion` gives :math:`\varepsilon` for a given :math:`m`). For example :math:`m = 128`,
:math:`n = 256`, :math:`\delta = 0.05` gives :math:`\varepsilon \approx 0.59` on squared distances; the PCA
picture needs only the coarse shape, and the scalar statistics above do not use the sketch.

References:
    Johnson & Lindenstrauss (1984); Dasgupta & Gupta (2003), "An elementary proof of a theorem of Johnson and
    Lindenstrauss"; Li et al. (2018) for PCA projections of optimisation paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "RandomProjection",
    "TrajectoryStep",
    "TrajectoryTracker",
    "coefficient_of_variation",
    "jl_distortion",
    "jl_sketch_dim",
    "layer_groups",
    "pca_projection",
]

_CHUNK = 65536


def _jl_rate(eps: float) -> float:
    return eps * eps / 2 - eps**3 / 3


def jl_sketch_dim(num_points: int, eps: float, delta: float = 0.05) -> int:
    r"""Sketch size :math:`m` keeping all squared pairwise distances of ``num_points`` within :math:`1\pm\varepsilon`.

    :math:`m = \lceil 2 \ln(n(n-1)/\delta) / (\varepsilon^2/2 - \varepsilon^3/3) \rceil` (Dasgupta & Gupta 2003).

    Raises:
        ValueError: If ``eps`` is not in (0, 1), ``delta`` not in (0, 1) or ``num_points < 2``.
    """
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points!r}")
    return math.ceil(2 * math.log(num_points * (num_points - 1) / delta) / _jl_rate(eps))


def jl_distortion(sketch_dim: int, num_points: int, delta: float = 0.05) -> float:
    r"""The :math:`\varepsilon` that a sketch of size ``sketch_dim`` guarantees for ``num_points`` points.

    Smallest :math:`\varepsilon \in (0, 1]` with :math:`\varepsilon^2/2 - \varepsilon^3/3 \ge 2\ln(n(n-1)/\delta)/m`;
    ``inf`` when even :math:`\varepsilon = 1` is not guaranteed (the sketch is too small for a bound).

    Raises:
        ValueError: If ``sketch_dim < 1`` or ``delta`` not in (0, 1).
    """
    if sketch_dim < 1:
        raise ValueError(f"sketch_dim must be >= 1, got {sketch_dim!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    n = max(int(num_points), 2)
    need = 2 * math.log(n * (n - 1) / delta) / sketch_dim
    if need > _jl_rate(1.0):
        return math.inf
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _jl_rate(mid) >= need:
            hi = mid
        else:
            lo = mid
    return hi


class RandomProjection:
    r"""A Gaussian random projection :math:`R \in \mathbb{R}^{m \times d}`, entries :math:`N(0, 1/m)`, from a seed.

    The matrix is drawn column-chunk by column-chunk from a private CPU generator, so it is the same on every
    machine and after a restart. It is kept in memory (float32) when :math:`m d \le` ``max_cached_entries``;
    otherwise each projection regenerates it chunk by chunk (memory :math:`O(m \cdot 65536)`, time
    :math:`O(m d)` random draws per call).

    Args:
        dim: Input dimension :math:`d`.
        sketch_dim: Output dimension :math:`m`.
        seed: Seed of the private generator.
        max_cached_entries: Cache the matrix when it has at most this many entries.

    Raises:
        ValueError: If ``dim`` or ``sketch_dim`` is not positive.
    """

    def __init__(self, dim: int, sketch_dim: int, seed: int = 0, max_cached_entries: int = 2**24) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim!r}")
        if sketch_dim < 1:
            raise ValueError(f"sketch_dim must be >= 1, got {sketch_dim!r}")
        self.dim = int(dim)
        self.sketch_dim = int(sketch_dim)
        self.seed = int(seed)
        self.cached = self.dim * self.sketch_dim <= max_cached_entries
        self._matrix: Tensor | None = None

    def _chunks(self):
        gen = torch.Generator().manual_seed(self.seed)
        scale = 1.0 / math.sqrt(self.sketch_dim)
        for start in range(0, self.dim, _CHUNK):
            stop = min(start + _CHUNK, self.dim)
            yield start, stop, torch.randn((self.sketch_dim, stop - start), generator=gen) * scale

    def matrix(self) -> Tensor:
        """The full matrix (materialised; cached only when ``cached``)."""
        if self._matrix is not None:
            return self._matrix
        mat = torch.cat([c for _, _, c in self._chunks()], dim=1)
        if self.cached:
            self._matrix = mat
        return mat

    def __call__(self, vector: Tensor) -> Tensor:
        """:math:`R x` for a flat vector ``x`` of length ``dim``, as float64 on the CPU.

        Raises:
            ValueError: If ``vector`` is not 1-D of length ``dim``.
        """
        if vector.dim() != 1 or vector.numel() != self.dim:
            raise ValueError(f"vector must be 1-D with {self.dim} entries, got shape {tuple(vector.shape)}")
        x = vector.detach().to("cpu", torch.float32)
        if self.cached:
            return (self.matrix() @ x).double()
        out = torch.zeros(self.sketch_dim, dtype=torch.float64)
        for start, stop, chunk in self._chunks():
            out += (chunk @ x[start:stop]).double()
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached matrix (0 when regenerated on the fly)."""
        return 0 if self._matrix is None else self._matrix.numel() * self._matrix.element_size()


def coefficient_of_variation(values: Tensor | list[float]) -> float:
    r""":math:`\mathrm{std}/\mathrm{mean}` (population std) of ``values``; nan for fewer than 2 values or mean 0."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if v.numel() < 2:
        return math.nan
    mean = v.mean()
    if mean == 0:
        return math.nan
    return float(v.std(unbiased=False) / mean)


def pca_projection(points: Tensor, k: int = 2) -> tuple[Tensor, Tensor]:
    r"""Project ``points`` (``n × m``, one row per trajectory point) on their first ``k`` principal axes.

    The points are centred; with :math:`X - \bar X = U S V^\top` the coordinates are :math:`U_{:, :k} S_{:k}` and
    the explained-variance ratios :math:`S_i^2 / \sum_j S_j^2`. Signs are fixed so that the largest-magnitude
    coordinate of each axis is positive.

    Returns:
        ``(coords, explained)``: ``coords`` is ``n × k`` (zero-padded if ``k`` exceeds the rank), ``explained`` has
        ``k`` entries.

    Raises:
        ValueError: If ``points`` is not 2-D with at least one row, or ``k < 1``.
    """
    if points.dim() != 2 or points.shape[0] < 1:
        raise ValueError(f"points must be 2-D with at least one row, got shape {tuple(points.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    x = points.double()
    x = x - x.mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    r = min(k, s.numel())
    coords = torch.zeros(points.shape[0], k, dtype=torch.float64)
    coords[:, :r] = u[:, :r] * s[:r]
    for i in range(r):
        j = torch.argmax(coords[:, i].abs())
        if coords[j, i] < 0:
            coords[:, i] = -coords[:, i]
    total = float((s**2).sum())
    explained = torch.zeros(k, dtype=torch.float64)
    if total > 0:
        explained[:r] = s[:r] ** 2 / total
    return coords, explained


def layer_groups(names: list[str]) -> dict[str, list[str]]:
    """Group parameter names by their module (``"net.0.weight"`` → ``"net.0"``), in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for name in names:
        layer = name.rpartition(".")[0] or name
        groups.setdefault(layer, []).append(name)
    return groups


@dataclass
class TrajectoryStep:
    """The statistics of one trajectory point (see the module docstring for the definitions).

    ``update_cosine`` is nan until there are two displacements, ``displacement_cv`` until there are two in the
    window, ``path_net_ratio`` while the distance from init is 0.
    """

    index: int
    displacement: float
    displacement_rel: float
    distance_from_init: float
    distance_from_init_rel: float
    path_length: float
    path_net_ratio: float
    update_cosine: float
    displacement_cv: float
    layer_displacement: dict[str, float] = field(default_factory=dict)
    layer_displacement_rel: dict[str, float] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """The scalar statistics by name (without the per-layer ones)."""
        return {
            "displacement": self.displacement,
            "displacement_rel": self.displacement_rel,
            "distance_from_init": self.distance_from_init,
            "distance_from_init_rel": self.distance_from_init_rel,
            "path_length": self.path_length,
            "path_net_ratio": self.path_net_ratio,
            "update_cosine": self.update_cosine,
            "displacement_cv": self.displacement_cv,
        }


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


class TrajectoryTracker:
    r"""Streaming trajectory statistics with memory independent of the number of points.

    Holds :math:`\theta_0`, :math:`\theta_{t-1}` and :math:`\theta_{t-1} - \theta_{t-2}` as flat CPU vectors in
    the parameters' dtype (3 × d numbers), the last ``window`` displacement norms, and a fixed
    ``max_points × sketch_dim`` float64 buffer of sketched points (see the module docstring).

    Args:
        sketch_dim: Size :math:`m` of the random projection.
        window: Number of recent displacements for the coefficient of variation.
        max_points: Rows of the sketch buffer (thinned by 2 when full).
        seed: Seed of the projection.

    Raises:
        ValueError: If an argument is not a positive integer (``max_points`` must be >= 2).

    Example:
        >>> t = TrajectoryTracker(sketch_dim=8)
        >>> t.start({"w": torch.zeros(3)})
        >>> t.update({"w": torch.tensor([3.0, 4.0, 0.0])}).distance_from_init
        5.0
    """

    def __init__(self, sketch_dim: int = 128, window: int = 10, max_points: int = 256, seed: int = 0) -> None:
        for name, value, low in (("sketch_dim", sketch_dim, 1), ("window", window, 1), ("max_points", max_points, 2)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.sketch_dim = sketch_dim
        self.window = window
        self.max_points = max_points
        self.seed = int(seed)
        self._reset()

    def _reset(self) -> None:
        self.names: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.init: Tensor | None = None
        self.prev: Tensor | None = None
        self.prev_delta: Tensor | None = None
        self.prev_delta_norm = math.nan
        self.path_length = 0.0
        self.index = 0
        self.recent: list[float] = []
        self.cosine_sum = 0.0
        self.cosine_count = 0
        self.sketches = torch.zeros(self.max_points, self.sketch_dim, dtype=torch.float64)
        self.sketch_index = torch.full((self.max_points,), -1, dtype=torch.long)
        self.num_stored = 0
        self.stride = 1
        self.last_sketch: Tensor | None = None
        self._projection: RandomProjection | None = None
        self._slices: dict[str, slice] = {}

    # ----------------------------------------------------------------- helpers
    @property
    def started(self) -> bool:
        """``True`` once :meth:`start` (or :meth:`load_state_dict`) has set the initial point."""
        return self.init is not None

    def _flat(self, params: Mapping[str, Tensor]) -> Tensor:
        names = list(params)
        if self.names and names != self.names:
            raise ValueError(f"parameter names changed since the trajectory started: {names[:3]} vs {self.names[:3]}")
        return torch.cat([params[n].detach().reshape(-1).to("cpu") for n in names])

    def _layout(self, params: Mapping[str, Tensor]) -> None:
        self.names = list(params)
        self.shapes = [tuple(params[n].shape) for n in self.names]
        self._build_slices()

    def _build_slices(self) -> None:
        offsets, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = math.prod(shape)
            offsets[name] = slice(start, start + n)
            start += n
        self._slices = offsets

    @property
    def projection(self) -> RandomProjection:
        """The random projection (built lazily from the dimension and seed)."""
        if self._projection is None:
            assert self.init is not None
            self._projection = RandomProjection(self.init.numel(), self.sketch_dim, self.seed)
        return self._projection

    def _store(self, index: int, sketch: Tensor) -> None:
        self.last_sketch = sketch
        if index % self.stride:
            return
        if self.num_stored == self.max_points:
            keep = torch.arange(0, self.max_points, 2)
            n = keep.numel()
            self.sketches[:n] = self.sketches[keep].clone()
            self.sketch_index[:n] = self.sketch_index[keep].clone()
            self.sketches[n:] = 0
            self.sketch_index[n:] = -1
            self.num_stored = n
            self.stride *= 2
            if index % self.stride:
                return
        self.sketches[self.num_stored] = sketch
        self.sketch_index[self.num_stored] = index
        self.num_stored += 1

    # ------------------------------------------------------------------- API
    def start(self, params: Mapping[str, Tensor]) -> None:
        """Set the initial point :math:`\\theta_0` (point index 0)."""
        self._reset()
        self._layout(params)
        self.init = self._flat(params).clone()
        self.prev = self.init.clone()
        self._store(0, torch.zeros(self.sketch_dim, dtype=torch.float64))

    def update(self, params: Mapping[str, Tensor]) -> TrajectoryStep:
        """Add the next point and return its statistics.

        Raises:
            RuntimeError: If :meth:`start` was not called.
            ValueError: If the parameter names or sizes differ from the initial point's.
        """
        if self.init is None or self.prev is None:
            raise RuntimeError("TrajectoryTracker.update called before start()")
        theta = self._flat(params)
        if theta.numel() != self.init.numel():
            raise ValueError(f"parameter vector has {theta.numel()} entries, the trajectory {self.init.numel()}")
        delta = theta - self.prev
        delta64 = delta.double()
        disp = float(delta64.norm())
        from_init = theta.double() - self.init.double()
        dist = float(from_init.norm())
        cos = math.nan
        if self.prev_delta is not None:
            cos = _div(float(delta64 @ self.prev_delta.double()), disp * self.prev_delta_norm)
        self.path_length += disp
        self.recent = (self.recent + [disp])[-self.window :]
        if math.isfinite(cos):
            self.cosine_sum += cos
            self.cosine_count += 1
        prev_norm = float(self.prev.double().norm())
        layer, layer_rel = {}, {}
        for group, names in layer_groups(self.names).items():
            sq = sum(float(delta64[self._slices[n]].pow(2).sum()) for n in names)
            ref = sum(float(self.prev[self._slices[n]].double().pow(2).sum()) for n in names)
            layer[group] = math.sqrt(sq)
            layer_rel[group] = _div(math.sqrt(sq), math.sqrt(ref))
        self.index += 1
        step = TrajectoryStep(
            index=self.index,
            displacement=disp,
            displacement_rel=_div(disp, prev_norm),
            distance_from_init=dist,
            distance_from_init_rel=_div(dist, float(self.init.double().norm())),
            path_length=self.path_length,
            path_net_ratio=_div(self.path_length, dist),
            update_cosine=cos,
            displacement_cv=coefficient_of_variation(self.recent),
            layer_displacement=layer,
            layer_displacement_rel=layer_rel,
        )
        self._store(self.index, self.projection(from_init))
        self.prev_delta = delta
        self.prev_delta_norm = disp
        self.prev = theta.clone()
        return step

    @property
    def mean_update_cosine(self) -> float:
        """Mean cosine between successive displacements over the whole trajectory (nan before two of them)."""
        return self.cosine_sum / self.cosine_count if self.cosine_count else math.nan

    @property
    def displacement_cv(self) -> float:
        """Coefficient of variation of the displacements in the current window."""
        return coefficient_of_variation(self.recent)

    def points(self) -> tuple[Tensor, Tensor]:
        """The sketched points kept so far and their point indices (the latest point is always included).

        Returns:
            ``(sketches, indices)``: ``n × sketch_dim`` float64 and ``n`` point indices, in order.
        """
        sk = self.sketches[: self.num_stored]
        idx = self.sketch_index[: self.num_stored]
        if self.last_sketch is not None and (self.num_stored == 0 or int(idx[-1]) != self.index):
            sk = torch.cat([sk, self.last_sketch[None]])
            idx = torch.cat([idx, torch.tensor([self.index])])
        return sk.clone(), idx.clone()

    def current_params(self) -> dict[str, Tensor]:
        """The latest point as a parameter dictionary (views into the stored CPU vector)."""
        if self.prev is None:
            raise RuntimeError("no point yet")
        return {n: self.prev[self._slices[n]].view(s) for n, s in zip(self.names, self.shapes)}

    @property
    def nbytes(self) -> int:
        """Bytes held by the tracker's tensors (full vectors, sketch buffer, cached projection)."""
        tensors = [self.init, self.prev, self.prev_delta, self.sketches, self.sketch_index, self.last_sketch]
        held = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return held + (self._projection.nbytes if self._projection is not None else 0)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the trajectory after a restart (the projection is rebuilt from the seed)."""
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "init": self.init,
            "prev": self.prev,
            "prev_delta": self.prev_delta,
            "prev_delta_norm": self.prev_delta_norm,
            "path_length": self.path_length,
            "index": self.index,
            "recent": list(self.recent),
            "cosine_sum": self.cosine_sum,
            "cosine_count": self.cosine_count,
            "sketches": self.sketches,
            "sketch_index": self.sketch_index,
            "num_stored": self.num_stored,
            "stride": self.stride,
            "last_sketch": self.last_sketch,
            "sketch_dim": self.sketch_dim,
            "max_points": self.max_points,
            "seed": self.seed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`.

        Raises:
            ValueError: If the state was written with another ``sketch_dim``, ``max_points`` or ``seed``.
        """
        for key in ("sketch_dim", "max_points", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"trajectory state has {key}={state[key]!r}, this tracker {getattr(self, key)!r}")
        self._reset()
        self.names = list(state["names"])
        self.shapes = [tuple(s) for s in state["shapes"]]
        self._build_slices()
        self.init = state["init"]
        self.prev = state["prev"]
        self.prev_delta = state.get("prev_delta")
        self.prev_delta_norm = float(state.get("prev_delta_norm", math.nan))
        self.path_length = float(state["path_length"])
        self.index = int(state["index"])
        self.recent = [float(v) for v in state.get("recent", [])]
        self.cosine_sum = float(state.get("cosine_sum", 0.0))
        self.cosine_count = int(state.get("cosine_count", 0))
        self.sketches = state["sketches"].clone()
        self.sketch_index = state["sketch_index"].clone()
        self.num_stored = int(state["num_stored"])
        self.stride = int(state["stride"])
        self.last_sketch = state.get("last_sketch")
