"""Benchmark: time per MAML meta-iteration on the sinusoid workload, vmap path against loop path.

Workload (Finn et al., 2017, section 5.1): 1-40-40-1 ReLU MLP, meta-batch 25 tasks, K = 10 support
and 10 query points per task, one inner SGD step of size 0.01. One measured iteration is

    loss = metatut.maml_loss(model, params, batch, inner_lr=0.01, vectorize=..., first_order=...)
    loss.backward(); adam.step()

for each execution path (``vectorize=True``: torch.func.vmap over tasks; ``vectorize=False``: one
task at a time with torch.autograd.grad; ``vectorize="auto"``: what metatut picks by default) and
both orders (second-order MAML and first-order MAML).

Method: a correctness gate first (the vmap meta-gradient must equal the loop's), then a warm-up,
then ``--rounds`` rounds; in each round every implementation runs ``--iters`` iterations, in an
order rotated from round to round (round-robin, all in one process), and the round's time per
iteration is recorded. The table reports the median and the inter-quartile range over rounds.

This is a benchmark, not a test: it prints a markdown table and exits 0, or exits 1 when the
correctness gate fails. Example::

    python bench/bench_sinusoid.py --rounds 30 --threads 2
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys

import torch

from machine import cpu_model  # bench/machine.py (the script's folder is on sys.path)

import metatut as mt
from metatut.timing import interleaved_timings

INNER_LR = 0.01
META_BATCH = 25
SHOTS = 10
QUERY = 10
META_LR = 1e-3

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--iters", type=int, default=10,
                        help="iterations per implementation per round (default 10)")
    parser.add_argument("--warmup", type=int, default=20,
                        help="untimed warm-up iterations per implementation (default 20)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or mps (default: metatut.pick_device(), i.e. CUDA if available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) (default: leave PyTorch's default)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="default float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("rounds", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


# --------------------------------------------------------------------------------------------- header
def header(device: torch.device, dtype: torch.dtype, args) -> list[str]:
    lines = [
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores visible)",
        f"- Python {platform.python_version()}, torch {torch.__version__}, metatut {mt.__version__}",
        f"- torch threads: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op",
        f"- device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"- dtype: {str(dtype).replace('torch.', '')}",
        f"- workload: 1-40-40-1 ReLU MLP, meta-batch {META_BATCH}, K = {SHOTS} support + {QUERY} query, "
        f"1 inner step, alpha = {INNER_LR}, Adam {META_LR}",
        f"- method: {args.warmup} warm-up iterations each, then {args.rounds} rounds x {args.iters} iterations "
        "each, implementations interleaved round-robin (rotated order)",
    ]
    if hasattr(os, "getloadavg"):
        lines.append("- load average before timing (1/5/15 min): "
                     + " / ".join(f"{x:.2f}" for x in os.getloadavg()))
    return lines


# ---------------------------------------------------------------------------------------- workload
def sample_batches(n: int, device: torch.device, dtype: torch.dtype, seed: int) -> list[mt.TaskBatch]:
    generator = mt.make_generator(seed, "cpu")
    tasks = mt.SinusoidTasks()
    return [tasks.sample(META_BATCH, SHOTS, QUERY, generator=generator, dtype=dtype).to(device)
            for _ in range(n)]


def meta_grad(model, params, batch, *, vectorize, first_order) -> dict[str, torch.Tensor]:
    loss = mt.maml_loss(model, params, batch, inner_lr=INNER_LR, vectorize=vectorize, first_order=first_order)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


def correctness_gate(model, params, batch, dtype) -> list[str]:
    """The vmap meta-gradient must equal the loop's (float32: rtol 1e-5, atol 1e-6), for both orders."""
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-10, 1e-12)
    report = []
    for first_order in (False, True):
        order = "first" if first_order else "second"
        g_vmap = meta_grad(model, params, batch, vectorize=True, first_order=first_order)
        g_loop = meta_grad(model, params, batch, vectorize=False, first_order=first_order)
        worst = max(float((g_vmap[k] - g_loop[k]).abs().max()) for k in params)
        try:
            for k in params:
                torch.testing.assert_close(g_vmap[k], g_loop[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
        except AssertionError as error:
            print(f"CORRECTNESS GATE FAILED ({order} order): vmap and loop meta-gradients differ.\n{error}",
                  file=sys.stderr)
            sys.exit(1)
        report.append(f"- correctness gate, {order} order: vmap == loop meta-gradient "
                      f"(max abs difference {worst:.1e}; rtol {rtol:g}, atol {atol:g})")
    return report


class Implementation:
    """One (path, order) pair with its own copy of the parameters and its own Adam state."""

    def __init__(self, name: str, order: str, vectorize, model, params0):
        self.name, self.order, self.vectorize = name, order, vectorize
        self.first_order = order == "first"
        self.model = model
        self.params = {k: v.detach().clone().requires_grad_() for k, v in params0.items()}
        self.optimizer = torch.optim.Adam(self.params.values(), lr=META_LR)
        self.timing = None  # metatut.timing.Timing: seconds per iteration over the rounds

    def step(self, batch: mt.TaskBatch) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = mt.maml_loss(self.model, self.params, batch, inner_lr=INNER_LR, vectorize=self.vectorize,
                            first_order=self.first_order)
        loss.backward()
        self.optimizer.step()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = mt.pick_device(args.device)
    except (RuntimeError, ValueError) as error:
        print(f"bench_sinusoid.py: {error}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]

    model = mt.mlp(seed=args.seed).to(device=device, dtype=dtype)
    params0 = mt.init_params(model, device=device, dtype=dtype)
    batches = sample_batches(max(8, args.iters), device, dtype, args.seed + 1)

    print("## MAML meta-iteration time, sinusoid workload\n")
    print("\n".join(header(device, dtype, args)))
    print("\n".join(correctness_gate(model, params0, batches[0], dtype)))
    auto_path = "vmap" if mt.prefers_vmap(model) else "loop"
    print(f"- vectorize='auto' picks the {auto_path} path for this model (metatut.prefers_vmap)")

    impls = [Implementation(name, order, vec, model, params0)
             for order in ("second", "first")
             for name, vec in (("vmap", True), ("loop", False), ("auto", "auto"))]

    def runner(impl: Implementation):
        counter = iter(range(10**12))
        return lambda: impl.step(batches[next(counter) % len(batches)])

    gc_was_enabled = gc.isenabled()
    gc.disable()  # warm-up (allocator, vmap/autograd caches, CPU frequency), then interleaved rounds
    try:
        timings = interleaved_timings({f"{impl.name} {impl.order}": runner(impl) for impl in impls},
                                      rounds=args.rounds, iters=args.iters, warmup=args.warmup, device=device)
    finally:
        if gc_was_enabled:
            gc.enable()
    for impl in impls:
        impl.timing = timings[f"{impl.name} {impl.order}"]

    medians = {(impl.name, impl.order): impl.timing.median for impl in impls}
    print()
    print("| path | order | median ms / iteration | IQR (ms) | loop / this |")
    print("| --- | --- | ---: | ---: | ---: |")
    for impl in impls:
        q1, q2, q3 = (1e3 * q for q in (impl.timing.q1, impl.timing.median, impl.timing.q3))
        ratio = medians[("loop", impl.order)] / medians[(impl.name, impl.order)]
        print(f"| {impl.name} | {impl.order} | {q2:.2f} | {q1:.2f} - {q3:.2f} | {ratio:.1f}x |")
    print()
    for order in ("second", "first"):
        speedup = medians[("loop", order)] / medians[("vmap", order)]
        print(f"- {order} order: loop / vmap = {speedup:.1f}x")
    if hasattr(os, "getloadavg"):
        print("- load average after timing (1/5/15 min): " + " / ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
