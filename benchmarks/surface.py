"""Surface benchmark: loss planes, contour width and linear interpolation, side by side with loss-landscapes, in one
process, on sklearn digits (one full batch of 1,797 samples, float32).

    python benchmarks/surface.py [--quick] [--threads N] [--out results.md]

Model: the MLP 64-256-256-10 (ReLU, 85,002 parameters) trained briefly with full-batch Adam (fixed seed); a second
one from another seed for the interpolation.

Sections:
1. A 25x25 plane through the weights along two filter-normalized directions: ours (``loss_plane``), loss-landscapes'
   ``random_plane(steps=25)`` (with and without its ``deepcopy_model``), and the floor: 625 plain forward passes of
   the loss through the module under ``no_grad``. Times interleaved (order rotated each round), best of N. Also:
   how far each leaves the model's weights from where they were.
2. Contour width along 8 rays (4 filter-normalized directions, both signs), level L0 + delta: ours (bracketing +
   Brent) against a reference of 101 points per ray (first crossing, linear interpolation between the bracketing
   grid points); the number of loss evaluations against a tenth of a 25x25 grid (62).
3. Linear interpolation between the two trained models, 100 steps: ours (``interpolation_barrier``, no BatchNorm
   here) against loss-landscapes' ``linear_interpolation`` (values and time), and the floor of 100 forward passes.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    compare_times,
    cross_entropy_loss,
    digits_tensors,
    header,
    markdown_table,
    mlp,
    num_params,
    train,
)

from lightning_geometry.functional.closure import LossClosure  # noqa: E402
from lightning_geometry.functional.connectivity import interpolation_barrier  # noqa: E402
from lightning_geometry.functional.params import param_norm, param_sub  # noqa: E402
from lightning_geometry.functional.surface import (  # noqa: E402
    contour_threshold,
    contour_width,
    loss_plane,
    random_directions,
    symmetric_grid,
)


def paired_ratios(fn_a, fn_b, rounds):
    """Time ``fn_a`` and ``fn_b`` back to back (order alternating) ``rounds`` times; return the per-pair ratios
    a/b and the summed times. On a shared, loaded machine adjacent pairs see the same load, so the median ratio
    is far steadier than a ratio of two best-of-N times taken minutes apart."""
    ratios, total_a, total_b = [], 0.0, 0.0
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        dt = [0.0, 0.0]
        for which in order:
            t0 = time.perf_counter()
            (fn_a if which == 0 else fn_b)()
            dt[which] = time.perf_counter() - t0
        ratios.append(dt[0] / dt[1])
        total_a += dt[0]
        total_b += dt[1]
    return np.asarray(ratios), total_a, total_b


def weights(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def moved(model, before):
    now = weights(model)
    return float(param_norm(param_sub(now, before)) / param_norm(before))


def reference_width(closure, direction, threshold, max_radius, points=101):
    """First crossing on a dense grid of ``points`` radii in [0, max_radius], linear between bracketing points."""
    ts = np.linspace(0.0, max_radius, points)
    base = closure.params
    values = []
    with torch.no_grad():
        for t in ts:
            values.append(float(closure({k: base[k] + t * direction[k] for k in base})))
    values = np.asarray(values)
    above = np.nonzero(values >= threshold)[0]
    if above.size == 0:
        return math.inf
    i = int(above[0])
    if i == 0:
        return 0.0
    t0, t1, v0, v1 = ts[i - 1], ts[i], values[i - 1], values[i]
    return float(t0 + (threshold - v0) * (t1 - t0) / (v1 - v0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timing round instead of five")
    parser.add_argument("--out", default=None, help="also write the Markdown report here")
    parser.add_argument("--delta", type=float, default=0.1, help="contour level L0 + delta")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeat = 1 if args.quick else 5

    import loss_landscapes
    from loss_landscapes.metrics import Loss

    out = [header("Surface benchmark: planes, contour width, interpolation (digits MLP 64-256-256-10)")]
    x, y = digits_tensors()
    batch = (x, y)
    model = mlp(seed=0)
    final_loss = train(model, batch, steps=300, lr=1e-3, seed=0)
    other = mlp(seed=1)
    other_loss = train(other, batch, steps=300, lr=1e-3, seed=1)
    model.eval()
    other.eval()
    closure = LossClosure(model, cross_entropy_loss, batch)
    out.append(f"- model: MLP 64-256-256-10, {num_params(model)} parameters; trained loss {final_loss:.4f} "
               f"(second model {other_loss:.4f}); data: digits, 1,797 samples, one batch, float32\n")

    # ---------------------------------------------------------------------------------------- 1. plane
    steps = 25
    d1, d2 = random_directions(closure.params, 2, seed=0)
    grid = symmetric_grid(1.0, steps)
    metric = Loss(F.cross_entropy, x, y)
    before = weights(model)

    def ours():
        return loss_plane(closure, d1, d2, grid).losses

    def floor():
        with torch.no_grad():
            for _ in range(steps * steps):
                F.cross_entropy(model(x), y)

    once = copy.deepcopy(model)
    once_before = weights(once)
    loss_landscapes.random_plane(once, metric, distance=1, steps=steps, normalization="filter")
    ll_moved_once = moved(once, once_before)
    ll_model = copy.deepcopy(model)
    ll_before = weights(ll_model)

    def ll_inplace():
        return loss_landscapes.random_plane(ll_model, metric, distance=1, steps=steps, normalization="filter")

    def ll_copy():
        return loss_landscapes.random_plane(model, metric, distance=1, steps=steps, normalization="filter",
                                            deepcopy_model=True)

    times = compare_times({"floor": floor, "ours": ours, "ll_copy": ll_copy, "ll_inplace": ll_inplace},
                          repeat=repeat, warmup=1)
    # per-row pairs: one row of our plane (25 evaluations, the row built as in the full plane) against 25 forwards
    row_state = {"i": 0}

    def ours_row():
        i = row_state["i"] % steps
        row_state["i"] += 1
        loss_plane(closure, d1, d2, grid[i : i + 1], grid)

    def floor_row():
        with torch.no_grad():
            for _ in range(steps):
                F.cross_entropy(model(x), y)

    ratios, _, _ = paired_ratios(ours_row, floor_row, rounds=steps * (2 if args.quick else 4))
    ll_plane_ratios, _, _ = paired_ratios(ll_copy, floor, rounds=2 if args.quick else 4)
    ours_moved = moved(model, before)
    ll_moved = moved(ll_model, ll_before)
    fb = times["floor"][0]
    rows = [
        ["floor: 625 forward passes (no_grad)", f"{fb:.3f}", f"{times['floor'][1]:.3f}", "1.00", "0"],
        ["ours: loss_plane 25x25", f"{times['ours'][0]:.3f}", f"{times['ours'][1]:.3f}",
         f"{times['ours'][0] / fb:.2f}", f"{ours_moved:.2g}"],
        ["loss-landscapes random_plane(steps=25, deepcopy_model=True)", f"{times['ll_copy'][0]:.3f}",
         f"{times['ll_copy'][1]:.3f}", f"{times['ll_copy'][0] / fb:.2f}", "0 (works on a copy)"],
        ["loss-landscapes random_plane(steps=25) (default, in place)", f"{times['ll_inplace'][0]:.3f}",
         f"{times['ll_inplace'][1]:.3f}", f"{times['ll_inplace'][0] / fb:.2f}", f"{ll_moved:.2g}"],
    ]
    out.append("## 1. 25x25 plane (625 loss evaluations)\n")
    out.append(markdown_table(["method", "best s", "median s", "x floor (best)", "weights moved / ||w||"], rows))
    ratio = float(np.median(ratios))
    q1, q3 = np.percentile(ratios, [25, 75])
    out.append(f"\nPaired per-row timing (one row of our plane, 25 evaluations, against 25 plain forwards, back to "
               f"back, {len(ratios)} pairs): median ratio {ratio:.3f} (quartiles {q1:.3f}-{q3:.3f}). The same for "
               f"loss-landscapes' whole plane (deepcopy_model=True) against 625 forwards, {len(ll_plane_ratios)} "
               f"pairs: median {np.median(ll_plane_ratios):.3f}.")
    out.append(f"\nTarget ours <= 1.1 x floor (median paired ratio): {'met' if ratio <= 1.1 else 'NOT met'} "
               f"({ratio:.2f}x). "
               f"loss-landscapes' default call left the weights moved by {100 * ll_moved_once:.0f} % of ||w|| after one "
               f"call and {100 * ll_moved:.0f} % after {1 + repeat} calls; ours by {ours_moved:.2g}.\n")

    # ---------------------------------------------------------------------------------------- 2. contour width
    dirs = random_directions(closure.params, 4, seed=1)
    rays = [{k: s * v for k, v in d.items()} for d in dirs for s in (1.0, -1.0)]
    loss0 = float(closure())
    threshold = contour_threshold(loss0, delta=args.delta)
    max_radius = 2.0
    ref = np.array([reference_width(closure, r, threshold, max_radius) for r in rays])
    result = contour_width(closure, rays, delta=args.delta, max_radius=max_radius, loss0=None)
    rel_err = np.abs(result.radii - ref) / ref
    crossed = np.isfinite(ref)
    out.append(f"## 2. Contour width, level L0 + {args.delta} (L0 = {loss0:.4f}), 8 rays, search radius "
               f"{max_radius}\n")
    rows = [[k, f"{ref[k]:.4f}", f"{result.radii[k]:.4f}", f"{100 * rel_err[k]:.3f}",
             int(result.evaluations_per_ray[k]), bool(result.censored[k])] for k in range(len(rays))]
    out.append(markdown_table(["ray", "reference (101 pts)", "ours", "rel. err. %", "evaluations", "censored"], rows))
    budget = steps * steps / 10
    out.append(
        f"\nOurs: {result.num_evaluations} evaluations in all (L0 included) against 8 x 101 = 808 for the reference "
        f"and a budget of {budget:.1f} (a tenth of 625): {'met' if result.num_evaluations <= budget else 'NOT met'}. "
        f"Max relative error on crossed rays {100 * np.max(rel_err[crossed]):.3f} % (target 1 %: "
        f"{'met' if np.max(rel_err[crossed]) <= 0.01 else 'NOT met'}); mean width {result.mean:.4f} "
        f"± {result.std:.4f}, censored {result.num_censored}.\n"
    )

    # ---------------------------------------------------------------------------------------- 3. interpolation
    n = 100
    metric_ll = Loss(F.cross_entropy, x, y)
    target = weights(other)

    def ours_line():
        return interpolation_barrier(closure, None, target, num_points=n + 1)

    def ll_line():
        return loss_landscapes.linear_interpolation(model, other, metric_ll, steps=n, deepcopy_model=True)

    def floor_line():
        with torch.no_grad():
            for _ in range(n):
                F.cross_entropy(model(x), y)

    t = compare_times({"floor": floor_line, "ours": ours_line, "ll": ll_line}, repeat=repeat, warmup=1)
    line_ratios, _, _ = paired_ratios(ours_line, floor_line, rounds=4 if args.quick else 10)
    ll_ratios, _, _ = paired_ratios(ll_line, floor_line, rounds=4 if args.quick else 10)
    ours_res = ours_line()
    ll_vals = np.asarray(ll_line(), dtype=float)
    # loss-landscapes evaluates t = 1/n, ..., 1 (the start point is skipped); ours t = 0, 1/n, ..., 1
    diff = np.max(np.abs(ours_res.losses[1:] - ll_vals))
    out.append(f"## 3. Linear interpolation between two trained models ({n} steps)\n")
    rows = [
        ["floor: 100 forward passes", f"{t['floor'][0]:.3f}", "1.00"],
        ["ours: interpolation_barrier(num_points=101)", f"{t['ours'][0]:.3f}", f"{t['ours'][0] / t['floor'][0]:.2f}"],
        ["loss-landscapes linear_interpolation(steps=100, deepcopy_model=True)", f"{t['ll'][0]:.3f}",
         f"{t['ll'][0] / t['floor'][0]:.2f}"],
    ]
    out.append(markdown_table(["method", "best s", "x floor (best)"], rows))
    out.append(f"\nPaired timing (back to back, {len(line_ratios)} pairs, median ratio to 100 forwards): ours "
               f"{np.median(line_ratios):.3f} (101 points), loss-landscapes {np.median(ll_ratios):.3f} (100 points).")
    out.append(f"\nValues agree to max |diff| = {diff:.2e} at the 100 common points (float32). Linear barrier "
               f"{ours_res.barrier:.4f} at t = {ours_res.barrier_t:.2f}. Ours evaluates 101 points (t = 0 included), "
               "loss-landscapes 100.\n")
    report = "\n".join(out)
    print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(report + "\n")


if __name__ == "__main__":
    main()
