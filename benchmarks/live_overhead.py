"""Overhead of the live geometry callbacks: fit time with and without CurvatureProbe + TrajectoryMonitor.

Usage::

    python benchmarks/live_overhead.py                 # 60 epochs, batch 256, MLP and CNN, 5 interleaved repeats
    python benchmarks/live_overhead.py --quick         # 20 epochs, 3 repeats
    python benchmarks/live_overhead.py --calibrate     # the constants of the cost model (_base.GeometryCallback)

Both arms run in one process, interleaved (plain, probed, plain, probed, ...), with one torch thread; the table
reports the median process CPU time (robust on a shared machine) and the median wall time. Default callback
settings: the compute budget (5 %) decides when the probes run. The memory part fits the TrajectoryMonitor with a
point at every epoch for 10 and for 200 epochs and reports the bytes its tensors hold and its checkpoint size.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import sys
import time
import warnings

import lightning.pytorch as pl
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)

from live_geometry import DigitsClassifier, DigitsDataModule  # noqa: E402

from lightning_geometry.callbacks import (  # noqa: E402
    CurvatureProbe,
    GeometryCallback,
    ProbeOutput,
    TrajectoryMonitor,
)

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


def _fit(cnn: bool, callbacks: list, epochs: int, batch_size: int = 256, **trainer_kw) -> tuple[float, float]:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, **trainer_kw)
    model, data = DigitsClassifier(cnn=cnn), DigitsDataModule(batch_size=batch_size)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, datamodule=data)
    return time.process_time() - cpu, time.perf_counter() - wall


_HOOKS = ("setup", "on_train_start", "on_train_batch_end", "on_train_epoch_end", "on_train_end", "on_fit_end")


def _timed(callbacks: list) -> list[float]:
    """Wrap the callbacks' hooks (on the instances) so that the CPU time spent inside them is added up."""
    spent = [0.0]
    for cb in callbacks:
        for name in _HOOKS:
            hook = getattr(cb, name)

            def wrapper(*args, __hook=hook, **kwargs):
                start = time.process_time()
                try:
                    return __hook(*args, **kwargs)
                finally:
                    spent[0] += time.process_time() - start

            setattr(cb, name, wrapper)
    return spent


def overhead(epochs: int, repeats: int) -> list[str]:
    rows = ["| model | epochs | plain CPU s | with callbacks CPU s | overhead CPU (A/B) | plain wall s | with wall s | "
            "overhead wall (A/B) | CPU inside the callbacks' hooks | curvature probes (cost fraction) | "
            "trajectory points (cost fraction) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    explicit_rows = ["| model | epochs | callbacks | CPU inside the callbacks' hooks | "
                     "curvature probes (cost fraction) | trajectory points (cost fraction) |", "|---|---|---|---|---|---|"]
    for cnn in (False, True):
        _fit(cnn, [], 2)  # warm-up
        plain, probed, inside, explicit_inside = [], [], [], []
        for _ in range(repeats):
            plain.append(_fit(cnn, [], epochs))
            cbs = [CurvatureProbe(), TrajectoryMonitor()]
            spent = _timed(cbs)
            probed.append(_fit(cnn, cbs, epochs))
            inside.append(spent[0] / (probed[-1][0] - spent[0]))
            explicit = [CurvatureProbe(every_n_epochs=20), TrajectoryMonitor(every_n_epochs=1)]
            spent = _timed(explicit)
            cpu = _fit(cnn, explicit, epochs)[0]
            explicit_inside.append(spent[0] / (cpu - spent[0]))
        pc, pw = statistics.median(p[0] for p in plain), statistics.median(p[1] for p in plain)
        qc, qw = statistics.median(p[0] for p in probed), statistics.median(p[1] for p in probed)
        rows.append(
            f"| {'CNN' if cnn else 'MLP'} | {epochs} | {pc:.2f} | {qc:.2f} | {100 * (qc / pc - 1):+.1f} % | {pw:.2f} | "
            f"{qw:.2f} | {100 * (qw / pw - 1):+.1f} % | {100 * statistics.median(inside):.1f} % | "
            f"{cbs[0].num_probes} ({cbs[0].cost_fraction:.3f}) | "
            f"{cbs[1].num_probes} ({cbs[1].cost_fraction:.3f}) |"
        )
        print(rows[-1], flush=True)
        explicit_rows.append(
            f"| {'CNN' if cnn else 'MLP'} | {epochs} | CurvatureProbe(every_n_epochs=20) + "
            f"TrajectoryMonitor(every_n_epochs=1) | {100 * statistics.median(explicit_inside):.1f} % | "
            f"{explicit[0].num_probes} ({explicit[0].cost_fraction:.3f}) | {explicit[1].num_probes} "
            f"({explicit[1].cost_fraction:.3f}) |"
        )
        print(explicit_rows[-1], flush=True)
    return rows + ["", "Explicit cadence (overrides the budget), for reference:", ""] + explicit_rows


def memory() -> list[str]:
    rows = ["| epochs | trajectory points | tracker tensors (bytes) | callback checkpoint state (bytes) |",
            "|---|---|---|---|"]
    for epochs in (10, 200):
        monitor = TrajectoryMonitor(every_n_epochs=1, max_points=64)
        _fit(False, [monitor], epochs, limit_train_batches=1, limit_val_batches=0)
        buf = io.BytesIO()
        torch.save(monitor.state_dict(), buf)
        rows.append(f"| {epochs} | {monitor.num_probes} | {monitor.tracker.nbytes} | {buf.getbuffer().nbytes} |")
        print(rows[-1], flush=True)
    return rows


class _Logs(GeometryCallback):
    probe_name = "calibration"

    def __init__(self, k: int) -> None:
        super().__init__(every_n_epochs=1)
        self.k = k

    def measure(self, trainer, pl_module):
        return ProbeOutput({f"s{i}": 1.0 for i in range(self.k)}, 0.0)


def calibrate(epochs: int = 20, repeats: int = 5) -> list[str]:
    """Measure the cost-model constants in sample-gradients (CPU time of one training sample's share of a step)."""
    from lightning_geometry.functional import curvature as F
    from lightning_geometry.functional.closure import LossClosure
    from live_geometry import cross_entropy_loss

    rows = ["| model | sample-gradient (us) | log call | HVP per sample | HVP per call | forward per sample | "
            "forward per call |", "|---|---|---|---|---|---|---|"]
    for cnn in (False, True):
        _fit(cnn, [], 2)
        plain = [_fit(cnn, [], epochs)[0] for _ in range(repeats)]
        logged = [_fit(cnn, [_Logs(28)], epochs)[0] for _ in range(repeats)]
        t_sg = statistics.median(plain) / (epochs * 1500)
        t_log = (statistics.median(logged) - statistics.median(plain)) / (epochs * 30)
        model = DigitsClassifier(cnn=cnn)
        data = DigitsDataModule()
        data.setup("fit")
        x, y = data.train_set.tensors
        hvp, fwd = {}, {}
        for n in (64, 1024):
            batch = (x[:n], y[:n])
            times = []
            for _ in range(3):
                start = time.process_time()
                res = F.top_hessian_eigenvalues(model, cross_entropy_loss, batch, tol=1e-12, max_iter=20)
                times.append((time.process_time() - start) / res.num_products)
            hvp[n] = min(times) / t_sg
            closure = LossClosure(model, cross_entropy_loss, batch)
            start = time.process_time()
            for _ in range(20):
                closure()
            fwd[n] = (time.process_time() - start) / 20 / t_sg
        slope_h, slope_f = (hvp[1024] - hvp[64]) / 960, (fwd[1024] - fwd[64]) / 960
        rows.append(f"| {'CNN' if cnn else 'MLP'} | {t_sg * 1e6:.1f} | {t_log / t_sg:.0f} | {slope_h:.2f} | "
                    f"{hvp[64] - 64 * slope_h:.0f} | {slope_f:.3f} | {fwd[64] - 64 * slope_f:.0f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--out", default=None, help="also write the markdown tables here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.epochs, args.repeats = 20, 3
    lines = [f"torch {torch.__version__}, lightning {pl.__version__}, 1 thread, {os.cpu_count()} CPUs", ""]
    if args.calibrate:
        lines += calibrate()
    else:
        lines += overhead(args.epochs, args.repeats) + [""] + memory()
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
