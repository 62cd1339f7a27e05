"""Benchmark: one MAML meta-iteration in metatut against learn2learn, higher and TorchOpt.

One measured iteration is the meta-loss (mean over the tasks of a meta-batch), its backward pass and
an Adam step on the meta-parameters, for every implementation. Workloads:

* W1: sinusoid regression, 1-40-40-1 ReLU MLP, meta-batch 25, K = 10 support + 10 query points,
  1 inner SGD step of 0.01, mean squared error (Finn et al., 2017, section 5.1);
* W2: Omniglot 5-way 1-shot, conv4, meta-batch 32, 15 queries per class, 1 inner step of 0.4,
  cross-entropy (section 5.2), on real images from the small background sets;
* W3: as W2 with 5 inner steps;

each in second order (MAML) and first order (FOMAML). Implementations: metatut's default path
(``vectorize="auto"``), its per-task loop, optionally bfloat16 autocast and ``torch.compile``;
learn2learn, higher and TorchOpt as their own examples use them; plain torch.func vmap; with a plain PyTorch copy of the
same network and the same initial weights; and a floor: ordinary training steps of the same network
on the same images without an inner loop.

Method: a correctness gate first (each meta-gradient against metatut's per-task loop on the same
batch and weights), then warm-up, then rounds in which every implementation runs ``--iters``
iterations in an order rotated each round, all in one process; medians and inter-quartile ranges
over rounds. Peak memory is measured afterwards in a fresh child process per implementation.
Peers that are not installed are skipped (``bash bench/setup_peers.sh`` installs them into
``bench/.peers``, which this script finds by itself). ``plain-vmap`` is MAML written directly with
``torch.func`` (vmap over grad, no library), the fair yardstick for metatut's vmap path.

Files: ``peers_common.py`` (constants, importing the peers), ``peers_workloads.py`` (W1-W3),
``peers_impls.py`` (the implementations), ``peers_measure.py`` (gate, timing, memory),
``peers_report.py`` (the Markdown report), this script (options and the run).

Example::

    python bench/bench_peers.py                          # all workloads, both orders
    python bench/bench_peers.py --workloads W1 --out bench/out/peers.md
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

from peers_common import (ALL_IMPLS, FLOOR_IMPLS, ORDERS, WORKLOADS, describe, import_accel, import_peers, mt,
                          progress)
from peers_impls import make_implementation
from peers_workloads import build_workload
from peers_measure import limit_compile_workers, load_average, measure_memory, memory_child, run_gate, run_timing
from peers_report import default_precisions, emit, header_lines, settings, workload_report


# ------------------------------------------------------------------------------------------- options
def comma_list(choices):
    """argparse type: a comma-separated list whose items must be in ``choices``."""
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(choices)} (got {text!r})")
        return list(dict.fromkeys(items))
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", type=comma_list(WORKLOADS), default=list(WORKLOADS),
                        help="comma list of W1 (sinusoid), W2 (Omniglot, 1 inner step), W3 (Omniglot, 5 inner steps)")
    parser.add_argument("--orders", type=comma_list(ORDERS), default=list(ORDERS),
                        help="comma list of second (MAML) and first (FOMAML); default both")
    parser.add_argument("--impls", type=comma_list(ALL_IMPLS), default=None,
                        help="restrict to these implementations (comma list of " + ", ".join(ALL_IMPLS) + ")")
    parser.add_argument("--precision", type=comma_list(("float32", "bfloat16")), default=None,
                        help="float32 always runs; bfloat16 adds metatut-bf16 (default: included when "
                             "metatut.accel.bf16_supported says the device computes bf16 natively)")
    parser.add_argument("--compile", action="store_true",
                        help="add metatut-compile (torch.compile of the meta-loss; compile time reported apart)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default W1 30, W2 5, W3 3)")
    parser.add_argument("--iters", type=int, default=None,
                        help="iterations per implementation per round (default W1 10, W2 1, W3 1)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed warm-up iterations per implementation (default W1 20, W2 2, W3 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights; data uses seed + 1")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--memory-iters", type=int, default=2,
                        help="iterations after one warm-up iteration in each memory child (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown report to this file")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("rounds", "iters", "threads", "memory_iters"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.memory_child is not None and args.memory_child not in ALL_IMPLS:
        parser.error(f"unknown implementation {args.memory_child!r}")
    return args



# ---------------------------------------------------------------------------------------------- main
def select_impls(args, accel, accel_reason: str, precisions: list[str]) -> tuple[list[str], list[str]]:
    """Implementation names to run and notes on the ones left out."""
    wanted = args.impls or [name for name in ALL_IMPLS if name != "metatut-compile" or args.compile]
    notes = []
    if "metatut-compile" in wanted and not args.compile:
        notes.append("metatut-compile needs --compile: left out")
    if "metatut-bf16" in wanted and "bfloat16" not in precisions:
        notes.append("metatut-bf16 left out: bfloat16 not in --precision"
                     + ("" if args.precision else " (the device has no native bf16 per metatut.accel.bf16_supported)"))
    if accel is None and any(n in wanted for n in ("metatut-bf16", "metatut-compile")):
        notes.append(f"metatut-bf16 and metatut-compile left out: {accel_reason}")
    chosen = [name for name in wanted
              if not (name == "metatut-compile" and (not args.compile or accel is None))
              and not (name == "metatut-bf16" and ("bfloat16" not in precisions or accel is None))]
    return chosen, notes


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.compile or args.memory_child == "metatut-compile":
        limit_compile_workers(args.threads)
    if args.memory_child is not None:
        return memory_child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_peers.py: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    accel, accel_reason = import_accel()
    precisions = args.precision or default_precisions(device, accel)
    names, global_notes = select_impls(args, accel, accel_reason, precisions)
    peers, peer_skips = import_peers(names)
    for impl, why in peer_skips.items():
        global_notes.append(f"{impl} skipped: {why}")
        progress(f"note: {impl} skipped: {why}")
    names = [name for name in names if name not in peer_skips]

    report: list[str] = []
    emit(report, ["## MAML meta-iteration: metatut against learn2learn, higher and TorchOpt", ""]
         + header_lines(device, peers, precisions)
         + [f"- note: {note}" for note in global_notes] + [""], args.out)

    failed_gate = False
    for key in args.workloads:
        progress(f"{key}: building the workload")
        try:
            workload = build_workload(key, device, args.seed)
        except Exception as error:  # e.g. Omniglot not available offline and no network
            emit(report, [f"### {key}", "", f"Skipped: could not build the workload: {describe(error)}", ""], args.out)
            continue
        if "metatut" in names:
            path = "vmap" if mt.prefers_vmap(workload.model) else "per-task loop"
            workload.notes.append(f"vectorize='auto' (the metatut row) runs the {path} path for this network "
                                  "(metatut.prefers_vmap)")
        impls, skipped = [], []
        for order in args.orders:
            for name in names:
                if name in FLOOR_IMPLS:
                    continue
                try:
                    impls.append(make_implementation(name, order, workload, device, peers=peers, accel=accel))
                except ValueError as error:
                    skipped.append(f"{name} ({order} order) not run: {error}")
                    progress(f"  {name} ({order} order) not run: {error}")
        impls += [make_implementation(name, None, workload, device, peers=peers, accel=accel)
                  for name in names if name in FLOOR_IMPLS]

        progress(f"{key}: correctness gate")
        gate = run_gate(impls, workload, device, peers, accel)
        for impl, result in gate.items():
            if not result.passed:
                progress(f"!! {key}: {impl.label} FAILED the correctness gate: excluded from timing")
                if impl.name != "metatut-bf16":
                    failed_gate = True
        timed = [impl for impl in impls if impl.kind == "floor" or gate[impl].passed]

        timing = settings(workload, args)
        progress(f"{key}: timing {len(timed)} implementations (warm-up {timing[0]}, {timing[2]} rounds x "
                 f"{timing[1]} iterations)")
        load_before = load_average()
        run_timing(timed, *timing, device)
        load_after = load_average()

        memory = {}
        if not args.no_memory:
            progress(f"{key}: peak memory, one child process per implementation")
            memory = {impl: measure_memory(impl, workload, args) for impl in timed}
        emit(report, workload_report(workload, timed, gate, memory, skipped, timing, device,
                                     (load_before, load_after)), args.out)
        del impls, timed, gate, workload
        gc.collect()

    if failed_gate:
        emit(report, ["**An implementation failed the correctness gate (see above): exit status 1.**", ""], args.out)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
