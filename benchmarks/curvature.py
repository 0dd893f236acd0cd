"""Curvature benchmark: Hessian-vector product cost, lambda_max and trace, side by side with PyHessian and
hessian-eigenthings, in one process, on sklearn digits (one full batch, float32).

    python benchmarks/curvature.py [--quick] [--out results.md]

Models (trained briefly with full-batch Adam, fixed seed, so that the Hessian is that of a trained net):
an MLP 64-256-256-10 (ReLU, 85,002 parameters) and a small CNN on the digits as 1x8x8 images
(conv 1->8 3x3, ReLU, conv 8->16 3x3, ReLU, flatten, linear -> 10; 3,818 parameters, so that its dense
Hessian is an affordable exact reference: one product per parameter).

Sections:
1. Cost per Hessian-vector product in units of one gradient (one forward + backward of the loss through the
   plain module), for our two routes, batched products over 10 vectors, PyHessian's reused graph, and a fresh
   double backward per product (PyHessian's dataloader path and hessian-eigenthings' operator).
2. lambda_max against a reference (dense eigvalsh in float64 for the CNN; our Lanczos in float64 at tol=1e-10
   for the MLP): PyHessian's default call, ours at several tolerances, hessian-eigenthings' power iteration and
   Lanczos. A target table says which of the stated targets are met.
3. Trace against a reference (dense trace for the CNN; a large-sample Hutch++ estimate for the MLP, stated as
   such): PyHessian's Hutchinson, ours (Hutchinson and Hutch++) with the same number of products.
4. PyHessian's repeated calls: what a second ``eigenvalues()`` call, and a second ``hessian(...)``
   construction without ``zero_grad``, return.

All times are ``time.perf_counter`` seconds, best of N repeats (the median is shown where it helps judge noise);
threads are whatever torch uses on this machine (printed in the header).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    cnn,
    compare_times,
    cross_entropy_loss,
    describe,
    digits_tensors,
    header,
    markdown_table,
    mlp,
    num_params,
    train,
)

from lightning_geometry.functional.curvature import hessian_trace, top_hessian_eigenvalues  # noqa: E402
from lightning_geometry.functional.hessian import hessian_operator  # noqa: E402

warnings.filterwarnings("ignore", message=".*create_graph=True.*")  # PyHessian's loss.backward(create_graph=True)

CRITERION = nn.CrossEntropyLoss()
DENSE_MAX_PARAMS = 5000  # dense reference (one product per parameter) only below this size


@dataclass
class Config:
    samples: int | None  # None: all 1,797
    mlp_hidden: tuple[int, ...]
    cnn_channels: tuple[int, int]
    train_steps: int
    block: int  # products per timed block in section 1
    repeat_products: int
    repeat_calls: int
    seeds: int
    tols: tuple[float, ...]
    trace_ref_products: int


FULL = Config(
    samples=None,
    mlp_hidden=(256, 256),
    cnn_channels=(8, 16),
    train_steps=300,
    block=10,
    repeat_products=7,
    repeat_calls=7,
    seeds=5,
    tols=(1e-1, 5e-2, 3e-2, 2e-2, 1e-2, 5e-3, 3e-3, 2e-3, 1e-3, 3e-4, 1e-4),
    trace_ref_products=900,
)
QUICK = Config(
    samples=200,
    mlp_hidden=(64, 64),
    cnn_channels=(2, 4),
    train_steps=50,
    block=10,
    repeat_products=3,
    repeat_calls=3,
    seeds=2,
    tols=(1e-1, 1e-2, 1e-3, 1e-4),
    trace_ref_products=90,
)


# ----------------------------------------------------------------------------------------------- helpers


def fmt(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def rel(x: float, ref: float) -> float:
    return abs(x - ref) / abs(ref)


def spread(values: list[float]) -> str:
    """'median (min-max)' of a list."""
    if len(values) == 1:
        return fmt(values[0], 2)
    return f"{fmt(statistics.median(values), 2)} ({fmt(min(values), 2)}–{fmt(max(values), 2)})"


def pspread(values: list[int]) -> str:
    if len(values) == 1 or min(values) == max(values):
        return str(values[0])
    return f"{int(statistics.median(values))} ({min(values)}–{max(values)})"


def clear_grads(model: nn.Module) -> None:
    model.zero_grad(set_to_none=True)


def grads_clean(model: nn.Module) -> bool:
    return all(p.grad is None for p in model.parameters())


def pyhessian_module() -> Any:
    import pyhessian  # noqa: F401  (the package rebinds the name `hessian` to the class)

    return sys.modules["pyhessian.hessian"]


class ProductCounter:
    """Counts PyHessian's reused-graph products by wrapping the function its ``hessian`` class calls."""

    def __init__(self) -> None:
        self.count = 0
        self._mod = pyhessian_module()
        self._orig = self._mod.hessian_vector_product

    def __enter__(self) -> ProductCounter:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return self._orig(*args, **kwargs)

        self._mod.hessian_vector_product = wrapped
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mod.hessian_vector_product = self._orig


def pyhessian_hessian(model: nn.Module, batch: Any = None, dataloader: Any = None) -> Any:
    from pyhessian import hessian

    if dataloader is not None:
        return hessian(model, CRITERION, dataloader=dataloader, cuda=False)
    return hessian(model, CRITERION, data=batch, cuda=False)


def random_vectors(model: nn.Module, count: int, seed: int = 0) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in model.named_parameters()}
        for _ in range(count)
    ]


# ----------------------------------------------------------------------------------- section 1: products


def product_costs(model: nn.Module, batch: Any, cfg: Config) -> tuple[list[list[Any]], dict[str, float]]:
    """Per-product cost of every route, timed in interleaved rounds over a block of ``cfg.block`` vectors."""
    from hessian_eigenthings import HessianOperator as EigOperator

    params = list(model.parameters())
    vecs = random_vectors(model, cfg.block)
    lists = [[v[k] for k, _ in model.named_parameters()] for v in vecs]
    flat = [torch.cat([t.reshape(-1) for t in v]) for v in lists]
    nb = len(vecs)
    hvp = pyhessian_module().hessian_vector_product

    def grads() -> None:
        for _ in range(nb):
            torch.autograd.grad(cross_entropy_loss(model, batch), params)

    def setup(route: str) -> Callable[[], None]:
        def fn() -> None:
            with hessian_operator(model, cross_entropy_loss, batch, route=route):
                pass

        return fn

    def ph_setup() -> None:
        pyhessian_hessian(model, batch=batch)
        clear_grads(model)

    with contextlib.ExitStack() as stack:
        op_g = stack.enter_context(hessian_operator(model, cross_entropy_loss, batch, route="graph"))
        op_f = stack.enter_context(hessian_operator(model, cross_entropy_loss, batch, route="func"))
        h_graph = pyhessian_hessian(model, batch=batch)  # builds its graph; .gradsH are copies of .grad
        clear_grads(model)
        h_fresh = pyhessian_hessian(model, dataloader=[batch])
        eop = EigOperator(model, [batch], cross_entropy_loss)
        fns: dict[str, Callable[[], Any]] = {
            "grad": grads,
            "graph": lambda: [op_g.matvec(v) for v in vecs],
            "graph_batched": lambda: op_g.matmat(vecs, batched=True),
            "func": lambda: [op_f.matvec(v) for v in vecs],
            "func_batched": lambda: op_f.matmat(vecs, batched=True),
            "pyhessian_graph": lambda: [hvp(h_graph.gradsH, h_graph.params, v) for v in lists],
            "pyhessian_fresh": lambda: [h_fresh.dataloader_hv_product(v) for v in lists],
            "eigenthings_fresh": lambda: [eop.matvec(v) for v in flat],
        }
        times = compare_times(fns, repeat=cfg.repeat_products, warmup=1)
        clear_grads(model)
    setups = compare_times({"graph": setup("graph"), "func": setup("func"), "pyhessian_graph": ph_setup},
                           repeat=cfg.repeat_products, warmup=1)
    clear_grads(model)
    assert grads_clean(model)

    t_grad = times["grad"][0] / nb
    labels = {
        "graph": ("ours `graph` matvec", "gradient graph built once per operator (setup), reused"),
        "graph_batched": (f"ours `graph` matmat batched ({nb} vectors)", "is_grads_batched"),
        "func": ("ours `func` matvec", "jvp of grad over functional_call, nothing kept"),
        "func_batched": (f"ours `func` matmat batched ({nb} vectors)", "vmap of the func product"),
        "pyhessian_graph": ("PyHessian reused graph (`hessian(data=...)`)", "its single-batch path"),
        "pyhessian_fresh": ("fresh double backward per product (PyHessian `dataloader_hv_product`)",
                            "zero_grad, forward, backward(create_graph=True), autograd.grad"),
        "eigenthings_fresh": ("fresh double backward per product (hessian-eigenthings `HessianOperator`)",
                              "forward, autograd.grad(create_graph=True), autograd.grad"),
    }
    setup_of = {"graph": "graph", "graph_batched": "graph", "func": "func", "func_batched": "func",
                "pyhessian_graph": "pyhessian_graph"}
    rows: list[list[Any]] = [["gradient (forward + backward, plain module)", ms(t_grad), "1.00", "–",
                              f"median {ms(times['grad'][1] / nb)} ms"]]
    costs = {"grad_ms": t_grad * 1e3}
    for key, (name, note) in labels.items():
        per = times[key][0] / nb
        costs[key] = per / t_grad
        su = setups[setup_of[key]][0] if key in setup_of else None
        rows.append([name, ms(per), f"{per / t_grad:.2f}", "–" if su is None else ms(su),
                     f"{note}; median {per_median(times[key], nb, t_grad)}"])
    return rows, costs


def per_median(t: tuple[float, float], nb: int, t_grad: float) -> str:
    return f"{t[1] / nb / t_grad:.2f} gradients"


# ------------------------------------------------------------------------------------ reference values


def dense_reference(model: nn.Module, batch: Any) -> tuple[Tensor, float, float, float]:
    """Dense Hessian, one graph-route product per unit vector (float32 products), symmetrised and
    decomposed in float64. Returns (eigenvalues ascending, trace, relative asymmetry, seconds)."""
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # untimed reference: one thread is robust to other jobs sharing the cores
    try:
        dense = _dense_columns(model, batch)
    finally:
        torch.set_num_threads(threads)
    asym = float((dense - dense.T).norm() / dense.norm())
    dense = (dense + dense.T) / 2
    evals = torch.linalg.eigvalsh(dense)
    return evals, float(dense.diagonal().sum()), asym, time.perf_counter() - t0


def _dense_columns(model: nn.Module, batch: Any) -> Tensor:
    with hessian_operator(model, cross_entropy_loss, batch, route="graph") as op:
        n = op.dim
        dense = torch.empty(n, n, dtype=torch.float64)
        e = torch.zeros(n)
        for i in range(n):
            e[i] = 1.0
            dense[:, i] = op.matvec_flat(e).double()
            e[i] = 0.0
    return dense


def float64_lanczos(model: nn.Module, batch: Any, seed: int = 0, tol: float = 1e-10) -> Any:
    m64 = copy.deepcopy(model).double()
    b64 = (batch[0].double(), batch[1])
    return top_hessian_eigenvalues(m64, cross_entropy_loss, b64, tol=tol, max_iter=400, seed=seed)


# ------------------------------------------------------------------------------------ section 2: lambda


def pyhessian_top(model: nn.Module, batch: Any, seed: int) -> tuple[float, int]:
    clear_grads(model)
    torch.manual_seed(seed)
    with ProductCounter() as counter:
        h = pyhessian_hessian(model, batch=batch)
        vals, _ = h.eigenvalues()  # defaults: maxIter=100, tol=1e-3, top_n=1
    clear_grads(model)
    return float(vals[0]), counter.count


def ours_top(model: nn.Module, batch: Any, tol: float, seed: int = 0, route: str = "graph") -> Any:
    return top_hessian_eigenvalues(model, cross_entropy_loss, batch, tol=tol, seed=seed, route=route)


def lambda_section(
    name: str, model: nn.Module, batch: Any, ref: float, cfg: Config, log: Callable[[str], None]
) -> tuple[str, list[list[Any]], dict[str, Any]]:
    from hessian_eigenthings import HessianOperator as EigOperator
    from hessian_eigenthings import lanczos as eig_lanczos
    from hessian_eigenthings import power_iteration_one

    seeds = list(range(cfg.seeds))

    # Accuracy and products over seeds (untimed).
    ph = [pyhessian_top(model, batch, s) for s in seeds]
    ph_errs = [rel(v, ref) for v, _ in ph]
    ph_err = statistics.median(ph_errs)
    log(f"  {name}: PyHessian {ph[0][0]:.6g} err {ph_errs[0]:.2e} products {ph[0][1]}")
    sweep: dict[float, dict[str, Any]] = {}
    for tol in cfg.tols:
        res = [ours_top(model, batch, tol, seed=s) for s in seeds]
        sweep[tol] = dict(errs=[rel(float(r.eigenvalues[0]), ref) for r in res],
                          products=[r.num_products for r in res], value=float(res[0].eigenvalues[0]),
                          converged=all(r.converged for r in res))
    assert grads_clean(model), "our eigenvalue call left .grad set"

    def pick(target: float) -> float | None:
        ok = [t for t in cfg.tols if max(sweep[t]["errs"]) <= target]
        return max(ok) if ok else None

    tol_ph, tol_4 = pick(ph_err), pick(1e-4)
    rf = ours_top(model, batch, 1e-3, route="func")

    def eig_power(tol: float, seed: int = 0) -> tuple[float, int]:
        op = EigOperator(model, [batch], cross_entropy_loss)
        lam, _, _, iters, _ = power_iteration_one(op, max_iter=100, tol=tol, seed=seed)
        return float(lam), iters

    steps = sweep[1e-3]["products"][0]

    def eig_lz(seed: int = 0) -> tuple[float, int]:
        op = EigOperator(model, [batch], cross_entropy_loss)
        res = eig_lanczos(op, k=1, max_iter=steps, which="LA", seed=seed)
        return float(res.eigenvalues[0]), res.iterations

    eig_runs = {("power", tol): [eig_power(tol, s) for s in seeds] for tol in (1e-3, 1e-4)}
    eig_runs[("lanczos", steps)] = [eig_lz(s) for s in seeds]
    clear_grads(model)

    # Wall time, seed 0, interleaved rounds (PyHessian's time includes its constructor, ours the operator set-up).
    our_tols = sorted({1e-3, *(t for t in (tol_ph, tol_4) if t is not None)}, reverse=True)
    fns: dict[str, Callable[[], Any]] = {"ph": lambda: pyhessian_top(model, batch, 0)}
    for tol in our_tols:
        fns[f"ours{tol}"] = lambda tol=tol: ours_top(model, batch, tol)
    fns["func"] = lambda: ours_top(model, batch, 1e-3, route="func")
    fns["power0.001"] = lambda: eig_power(1e-3)
    fns["power0.0001"] = lambda: eig_power(1e-4)
    fns["lanczos"] = eig_lz
    times = compare_times(fns, repeat=cfg.repeat_calls, warmup=1)
    clear_grads(model)
    t_ph = times["ph"][0]
    log(f"  {name}: times " + ", ".join(f"{k}={v[0] * 1e3:.1f}ms" for k, v in times.items()))

    def tcols(key: str) -> list[str]:
        return [ms(times[key][0]), ms(times[key][1]), f"{times[key][0] / t_ph:.2f}"]

    rows: list[list[Any]] = [
        ["PyHessian `eigenvalues()` (power, maxIter=100, tol=1e-3)", fmt(ph[0][0], 7), fmt(ph_errs[0], 2),
         spread(ph_errs), pspread([p for _, p in ph]), *tcols("ph")]
    ]
    for tol in our_tols:
        labels = [f"tol={tol:g}"]
        if tol == 1e-3:
            labels.append("default")
        if tol == tol_ph:
            labels.append("largest tol reaching PyHessian's median accuracy on every seed")
        if tol == tol_4:
            labels.append("largest tol reaching 1e-4 on every seed")
        sw = sweep[tol]
        rows.append([f"ours Lanczos `graph` ({', '.join(labels)})", fmt(sw["value"], 7), fmt(sw["errs"][0], 2),
                     spread(sw["errs"]), pspread(sw["products"]), *tcols(f"ours{tol}")])
    rows.append(["ours Lanczos `func` (tol=1e-3)", fmt(float(rf.eigenvalues[0]), 7),
                 fmt(rel(float(rf.eigenvalues[0]), ref), 2), "–", str(rf.num_products), *tcols("func")])
    for (kind, arg), runs in eig_runs.items():
        errs = [rel(v, ref) for v, _ in runs]
        if kind == "power":
            label, key = f"hessian-eigenthings `power_iteration_one` (tol={arg:g}, max_iter=100)", f"power{arg:g}"
        else:
            label, key = f"hessian-eigenthings `lanczos` (max_iter={arg} = our default's products, which=LA)", kind
        rows.append([label, fmt(runs[0][0], 7), fmt(errs[0], 2), spread(errs), pspread([p for _, p in runs]),
                     *tcols(key)])

    sweep_rows = [
        [f"{tol:g}", pspread(sweep[tol]["products"]), fmt(sweep[tol]["errs"][0], 2), spread(sweep[tol]["errs"]),
         "yes" if sweep[tol]["converged"] else "no"]
        for tol in cfg.tols
    ]
    sweep_md = markdown_table(
        ["tol", "products, median (min–max)", "rel. error seed 0", "rel. error median (min–max)", "converged"],
        sweep_rows,
    )
    info = dict(
        ph_time=t_ph, ph_err0=ph_errs[0], ph_err_med=ph_err, p_ph=statistics.median([p for _, p in ph]),
        tol_ph=tol_ph, tol_4=tol_4,
        t_ph_acc=times[f"ours{tol_ph}"][0] if tol_ph is not None else None,
        p_ph_acc=statistics.median(sweep[tol_ph]["products"]) if tol_ph is not None else None,
        t_4=times[f"ours{tol_4}"][0] if tol_4 is not None else None,
        p_4=statistics.median(sweep[tol_4]["products"]) if tol_4 is not None else None,
    )
    return sweep_md, rows, info


# ------------------------------------------------------------------------------------- section 3: trace


def pyhessian_trace(model: nn.Module, batch: Any, seed: int) -> tuple[float, float, int]:
    clear_grads(model)
    torch.manual_seed(seed)
    h = pyhessian_hessian(model, batch=batch)
    vhv = h.trace()  # defaults: maxIter=100, tol=1e-3
    clear_grads(model)
    n = len(vhv)
    t = torch.tensor(vhv, dtype=torch.float64)
    se = float(t.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(t.mean()), se, n


def trace_section(model: nn.Module, batch: Any, ref: float, cfg: Config) -> list[list[Any]]:
    from hessian_eigenthings import HessianOperator as EigOperator
    from hessian_eigenthings import hutch_plus_plus

    seeds = list(range(cfg.seeds))
    ph = [pyhessian_trace(model, batch, s) for s in seeds]
    counts = [n for _, _, n in ph]

    def ours(method: str) -> Callable[[int, int], tuple[float, float, int]]:
        def fn(seed: int, n: int) -> tuple[float, float, int]:
            r = hessian_trace(model, cross_entropy_loss, batch, num_samples=max(n, 3), method=method, seed=seed)
            return r.trace, r.std_error, r.num_products

        return fn

    def eig_hpp(seed: int, n: int) -> tuple[float, float, int]:
        op = EigOperator(model, [batch], cross_entropy_loss)
        r = hutch_plus_plus(op, num_matvecs=max(n, 3), seed=seed)
        return r.estimate, r.stderr, 3 * max(1, max(n, 3) // 3)

    methods: dict[str, tuple[str, Callable[[int, int], tuple[float, float, int]]]] = {
        "ph": ("PyHessian `trace()` (Hutchinson, maxIter=100, tol=1e-3)",
               lambda seed, n: pyhessian_trace(model, batch, seed)),
        "hutchinson": ("ours `hessian_trace` hutchinson (PyHessian's product count, per seed)", ours("hutchinson")),
        "hutch++": ("ours `hessian_trace` hutch++ (PyHessian's product count, per seed)", ours("hutch++")),
        "eig": ("hessian-eigenthings `hutch_plus_plus` (num_matvecs = PyHessian's count; uses 3·⌊n/3⌋)", eig_hpp),
    }
    runs = {key: ph if key == "ph" else [fn(s, n) for s, n in zip(seeds, counts)]
            for key, (_, fn) in methods.items()}
    assert grads_clean(model), "a trace call left .grad set"
    clear_grads(model)
    times = compare_times({key: (lambda fn=fn: fn(0, counts[0])) for key, (_, fn) in methods.items()},
                          repeat=cfg.repeat_calls, warmup=1)
    clear_grads(model)
    t_ph = times["ph"][0]
    rows: list[list[Any]] = []
    for key, (label, _) in methods.items():
        rs = runs[key]
        errs = [rel(v, ref) for v, _, _ in rs]
        rms = math.sqrt(sum(e * e for e in errs) / len(errs))
        v0, se0, _ = rs[0]
        z = abs(v0 - ref) / se0 if se0 and not math.isnan(se0) else float("nan")
        rows.append([label, pspread([n for _, _, n in rs]), fmt(v0, 6), fmt(se0, 3), fmt(errs[0], 2), fmt(z, 2),
                     fmt(rms, 2), ms(times[key][0]), ms(times[key][1]), f"{times[key][0] / t_ph:.2f}"])
    return rows


# --------------------------------------------------------------------------- section 4: PyHessian repeats


def pyhessian_repeats(model: nn.Module, batch: Any, ref: float) -> list[list[Any]]:
    rows = []
    clear_grads(model)
    torch.manual_seed(0)
    h = pyhessian_hessian(model, batch=batch)
    e1 = float(h.eigenvalues()[0][0])
    e2 = float(h.eigenvalues()[0][0])  # same object, no zero_grad by the caller, RNG not reseeded
    torch.manual_seed(0)
    e3 = float(h.eigenvalues()[0][0])  # same object, RNG reseeded
    del h
    clear_grads(model)
    rows.append(["1st `eigenvalues()` (torch.manual_seed(0) before the constructor)", fmt(e1, 7), fmt(rel(e1, ref), 2)])
    rows.append(["2nd `eigenvalues()` on the same object, no zero_grad, RNG not reseeded", fmt(e2, 7),
                 fmt(rel(e2, ref), 2)])
    rows.append(["3rd `eigenvalues()`, torch.manual_seed(0) again", fmt(e3, 7), fmt(rel(e3, ref), 2)])
    # A second constructor without zero_grad in between: loss.backward(create_graph=True) accumulates into .grad.
    clear_grads(model)
    pyhessian_hessian(model, batch=batch)
    h2 = pyhessian_hessian(model, batch=batch)
    torch.manual_seed(0)
    e4 = float(h2.eigenvalues()[0][0])
    del h2
    clear_grads(model)
    rows.append(["`hessian(...)` built twice without zero_grad, then `eigenvalues()` (seed 0)", fmt(e4, 7),
                 f"{fmt(rel(e4, ref), 2)} (ratio to reference {e4 / ref:.3f})"])
    # A plain .grad left over from training (no graph): harmless for the products.
    cross_entropy_loss(model, batch).backward()
    torch.manual_seed(0)
    h3 = pyhessian_hessian(model, batch=batch)
    e5 = float(h3.eigenvalues()[0][0])
    del h3
    clear_grads(model)
    rows.append(["`.grad` left by a plain `loss.backward()` before `hessian(...)` (seed 0)", fmt(e5, 7),
                 fmt(rel(e5, ref), 2)])
    return rows


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models and data, few repeats (< 60 s)")
    parser.add_argument("--out", type=str, default=None, help="also write the Markdown report to this path")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: what torch picks on this machine; 1 with --quick); on a "
                             "machine shared with other jobs, 1 avoids the collapse of oversubscribed OpenMP threads")
    args = parser.parse_args(argv)
    if args.threads is None and args.quick:
        args.threads = 1  # a smoke run: one thread keeps it under a minute even when other jobs share the cores
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    x_vec, y = digits_tensors()
    x_img, _ = digits_tensors(images=True)
    if cfg.samples is not None:
        x_vec, x_img, y = x_vec[: cfg.samples], x_img[: cfg.samples], y[: cfg.samples]
    models = {
        "MLP": (mlp(hidden=cfg.mlp_hidden), (x_vec, y)),
        "CNN": (cnn(channels=cfg.cnn_channels), (x_img, y)),
    }
    out: list[str] = [header("Curvature benchmark: Hessian-vector products, λ_max, trace" +
                             (" (--quick)" if args.quick else ""))]
    setup_rows = []
    for name, (model, batch) in models.items():
        t0 = time.perf_counter()
        loss = train(model, batch, steps=cfg.train_steps, lr=1e-3, seed=0)
        setup_rows.append([name, describe(model), f"{num_params(model):,}",
                           f"{batch[0].shape[0]:,}", f"{cfg.train_steps} Adam steps, lr 1e-3",
                           fmt(loss, 3), f"{time.perf_counter() - t0:.1f}"])
        log(f"trained {name}: {num_params(model)} params, loss {loss:.4g}")
    out.append(f"- data: sklearn `load_digits`, standardised, one full batch of {x_vec.shape[0]:,} samples, "
               "float32; loss: mean cross-entropy; models in eval mode.")
    out.append("- times: `time.perf_counter`, best of N repeats in this process; 'gradients' = per-product time "
               "divided by one plain forward + backward of the loss.\n")
    out.append(markdown_table(["model", "architecture", "params", "samples", "training", "final loss", "train s"],
                              setup_rows))

    # Section 1
    out.append("\n## 1. Cost per Hessian-vector product\n")
    out.append(f"Each product timed over a block of {cfg.block} random vectors, {cfg.repeat_products} interleaved "
               "rounds (best shown; the note gives the median). 'setup' is opening the operator: for `graph` one "
               "gradient with `create_graph=True`, for `func` one loss evaluation; PyHessian's constructor does "
               "`loss.backward(create_graph=True)`.\n")
    cost_info = {}
    for name, (model, batch) in models.items():
        rows, costs = product_costs(model, batch, cfg)
        cost_info[name] = costs
        log(f"products {name}: " + ", ".join(f"{k}={v:.3g}" for k, v in costs.items()))
        out.append(f"### {name}\n")
        out.append(markdown_table(["product", "ms / product", "gradients / product", "setup ms", "note"], rows))
        out.append("")

    # References
    out.append("## 2. λ_max\n")
    refs: dict[str, dict[str, Any]] = {}
    ref_rows = []
    for name, (model, batch) in models.items():
        r64 = float64_lanczos(model, batch, seed=0)
        r64b = float64_lanczos(model, batch, seed=1)
        lam64 = float(r64.eigenvalues[0])
        lam64b = float(r64b.eigenvalues[0])
        info: dict[str, Any] = dict(lam=lam64, lam_kind="float64 Lanczos, tol=1e-10")
        lam_ref = (f"float64 Lanczos, tol=1e-10 (model and data cast to float64; {r64.num_products} products, "
                   f"converged={r64.converged}, residual {fmt(float(r64.residuals[0]), 2)})")
        checks = f"float64 Lanczos from seed 1: {fmt(lam64b, 9)} (rel. diff {fmt(rel(lam64b, lam64), 2)})"
        if num_params(model) <= DENSE_MAX_PARAMS:
            evals, tr, asym, secs = dense_reference(model, batch)
            lam_dense = float(evals[-1])
            info.update(trace=tr, trace_kind="dense trace (exact up to float32 products)")
            checks += (f"; dense Hessian (one float32 graph product per column, float64 eigvalsh, {secs:.0f} s): "
                       f"λ_max {fmt(lam_dense, 9)} (rel. diff {fmt(rel(lam_dense, lam64), 2)}, the float32 floor: "
                       f"‖H−Hᵀ‖/‖H‖ = {fmt(asym, 2)}), λ_2 {fmt(float(evals[-2]), 6)}, λ_min {fmt(float(evals[0]), 4)}")
            ref_rows.append([name, lam_ref, fmt(lam64, 9), checks, fmt(tr, 7), "dense trace (exact)"])
        else:
            tref = hessian_trace(model, cross_entropy_loss, batch, num_samples=cfg.trace_ref_products,
                                 method="hutch++", seed=10_000)
            info.update(trace=tref.trace, trace_kind=f"Hutch++ estimate, {tref.num_products} products, seed 10000")
            ref_rows.append([name, lam_ref, fmt(lam64, 9), checks + f" (dense: {num_params(model):,}² too big)",
                             f"{fmt(tref.trace, 7)} ± {fmt(tref.std_error, 2)}",
                             f"Hutch++ estimate, {tref.num_products} products, seed 10000 (not exact; ± std error)"])
        refs[name] = info
        log(f"reference {name}: lambda {info['lam']:.9g} trace {info['trace']:.7g}")
    out.append("The λ_max reference is float64 Lanczos for both models: it agrees with the dense eigvalsh to the "
               "float32 rounding of the dense matrix's entries, and with itself across start vectors to ~1e-15. "
               "Errors below ~1e-6 in the float32 rows are the float32 floor.\n")
    out.append(markdown_table(["model", "λ_max reference", "λ_max", "cross-checks", "trace reference value",
                               "trace reference kind"], ref_rows))
    out.append("")
    lam_info = {}
    headers = ["method", "λ_max (seed 0)", "rel. error seed 0", f"rel. error median (min–max), {cfg.seeds} seeds",
               "products, median (min–max)", "ms best (seed 0)", "ms median", "best time / PyHessian's"]
    for name, (model, batch) in models.items():
        sweep_md, rows, info = lambda_section(name, model, batch, refs[name]["lam"], cfg, log)
        lam_info[name] = info
        out.append(f"### {name} (reference λ_max = {fmt(refs[name]['lam'], 9)}, {refs[name]['lam_kind']})\n")
        out.append(markdown_table(headers, rows))
        out.append(f"\nOur tolerance sweep ({name}, graph route, seeds 0–{cfg.seeds - 1}):\n")
        out.append(sweep_md)
        out.append("")

    # Targets
    out.append("### Targets\n")
    trows = []
    for name in models:
        i = lam_info[name]
        t_ph = i["ph_time"]
        if i["tol_4"] is not None:
            ok = i["t_4"] <= t_ph
            trows.append([name, "λ_max to 1e-4 relative in ≤ PyHessian's default wall time",
                          f"tol={i['tol_4']:g}: {ms(i['t_4'])} ms vs PyHessian {ms(t_ph)} ms "
                          f"(ratio {i['t_4'] / t_ph:.2f}); {i['p_4']:g} vs {i['p_ph']:g} products; "
                          f"PyHessian's own median error {fmt(i['ph_err_med'], 2)}",
                          "met" if ok else "NOT met"])
        else:
            trows.append([name, "λ_max to 1e-4 relative in ≤ PyHessian's default wall time",
                          "no tolerance in the sweep reached 1e-4", "NOT met"])
        if i["tol_ph"] is not None:
            ok = i["t_ph_acc"] <= 0.5 * t_ph
            trows.append([name, "at PyHessian's accuracy (its median error "
                                f"{fmt(i['ph_err_med'], 2)}), ≤ ½ its time",
                          f"tol={i['tol_ph']:g}: {ms(i['t_ph_acc'])} ms vs {ms(t_ph)} ms "
                          f"(ratio {i['t_ph_acc'] / t_ph:.2f})", "met" if ok else "NOT met"])
            ok = i["p_ph_acc"] < i["p_ph"]
            trows.append([name, "fewer products than PyHessian's power iteration for the same accuracy",
                          f"{i['p_ph_acc']:g} vs {i['p_ph']:g} (medians over seeds)", "met" if ok else "NOT met"])
        else:
            trows.append([name, "at PyHessian's accuracy, ≤ ½ its time",
                          f"no tolerance in the sweep reached PyHessian's error {fmt(i['ph_err_med'], 2)}", "NOT met"])
    out.append(markdown_table(["model", "target", "measured", "verdict"], trows))
    out.append("")

    # Section 3
    out.append("## 3. Trace\n")
    theaders = ["method", "products (median, min–max)", "estimate (seed 0)", "std error (seed 0)",
                "rel. error (seed 0)", "|error| / std error (seed 0)", f"RMS rel. error, {cfg.seeds} seeds",
                "ms best (seed 0)", "ms median", "best time / PyHessian's"]
    for name, (model, batch) in models.items():
        rows = trace_section(model, batch, refs[name]["trace"], cfg)
        log(f"trace {name} done")
        out.append(f"### {name} (reference trace = {fmt(refs[name]['trace'], 7)}, {refs[name]['trace_kind']})\n")
        out.append(markdown_table(theaders, rows))
        out.append("")

    # Section 4
    out.append("## 4. PyHessian: repeated calls\n")
    for name, (model, batch) in models.items():
        rows = pyhessian_repeats(model, batch, refs[name]["lam"])
        out.append(f"### {name} (reference λ_max = {fmt(refs[name]['lam'], 9)})\n")
        out.append(markdown_table(["call", "λ_max", "rel. error"], rows))
        out.append("")

    elapsed = time.perf_counter() - t_start
    out.append(f"_Total {elapsed:.0f} s; load average at start {load_start[0]:.2f}, at end "
               f"{os.getloadavg()[0]:.2f} (other jobs share the CPU: compare ratios within this run)._")
    report = "\n".join(out) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(report)
    return report


if __name__ == "__main__":
    main()
