"""Measurement for ``bench_peers.py``: the correctness gate, interleaved timing and peak memory per implementation
(one child process each)."""
from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from peers_common import BF16_GATE, FLOOR_IMPLS, GATE_RTOL, MEMORY_TAG, describe, import_accel, import_peers, progress
from peers_impls import Implementation, make_implementation
from peers_workloads import Workload, build_workload
from metatut.timing import interleaved_timings, synchronize


# ------------------------------------------------------------------------------------------- helpers
def proc_status_mb(field_name: str) -> float | None:
    """A memory field of /proc/self/status (``VmRSS``: now, ``VmHWM``: peak) in MB; None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def max_rss_mb() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in MB (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    On Linux ``VmHWM``: ``ru_maxrss`` of a child started by fork + exec also counts the parent's
    resident memory at the time of the fork, which would hide the child's own peak.
    """
    hwm = proc_status_mb("VmHWM")
    return hwm if hwm is not None else max_rss_mb()


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0, ``/proc/self/clear_refs``); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_average() -> str:
    if not hasattr(os, "getloadavg"):
        return "n/a"
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def limit_compile_workers(threads: int) -> None:
    """Give torch.compile's code generation no more worker processes than ``--threads``."""
    try:
        import torch._inductor.config as inductor_config
        inductor_config.compile_threads = threads
    except (ImportError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------- gate
@dataclass
class GateResult:
    relative_error: float = float("nan")
    cosine: float = float("nan")
    limit: float = GATE_RTOL
    passed: bool = False
    error: str = ""
    reference: bool = False


def compare(gradient: Tensor, reference: Tensor, limit: float) -> GateResult:
    """Global relative error ||g - g_ref|| / ||g_ref|| over all parameters, and the cosine similarity."""
    ref_norm = reference.norm()
    relative = float((gradient - reference).norm() / ref_norm) if ref_norm > 0 else float("inf")
    cosine = float(gradient @ reference / (gradient.norm() * ref_norm)) if gradient.norm() > 0 else 0.0
    passed = bool(torch.isfinite(gradient).all()) and relative <= limit
    return GateResult(relative, cosine, limit, passed)


def run_gate(impls: list[Implementation], workload: Workload, device, peers, accel) -> dict:
    """Each implementation's meta-gradient on the first batch against metatut's per-task loop."""
    batch = workload.batches[0]
    references: dict[str, Tensor] = {}
    results: dict[Implementation, GateResult] = {}
    for order in dict.fromkeys(impl.order for impl in impls if impl.kind != "floor"):
        loop = next((impl for impl in impls if impl.name == "metatut-loop" and impl.order == order), None)
        if loop is None:
            loop = make_implementation("metatut-loop", order, workload, device, peers=peers, accel=accel)
        start = time.perf_counter()
        references[order] = loop.meta_gradient(batch)
        progress(f"  gate reference: metatut-loop, {order} order ({time.perf_counter() - start:.1f} s)")
    for impl in impls:
        if impl.kind == "floor":
            continue
        limit = BF16_GATE if impl.name == "metatut-bf16" else GATE_RTOL
        start = time.perf_counter()
        try:
            if impl.name == "metatut-loop":
                result = compare(references[impl.order], references[impl.order], limit)
                result.reference = True
            else:
                result = compare(impl.meta_gradient(batch), references[impl.order], limit)
        except Exception as error:  # an implementation that crashes fails its gate, loudly
            result = GateResult(limit=limit, error=describe(error))
        results[impl] = result
        verdict = "pass" if result.passed else "FAIL"
        detail = result.error or f"relative error {result.relative_error:.2e}, cosine {result.cosine:.6f}"
        progress(f"  gate {impl.label}: {detail} (limit {limit:g}): {verdict} ({time.perf_counter() - start:.1f} s)")
    return results


# -------------------------------------------------------------------------------------------- timing
def run_timing(impls: list[Implementation], warmup: int, iters: int, rounds: int, device) -> None:
    """Warm-up (timed apart, for the log), then :func:`metatut.timing.interleaved_timings`: ``rounds`` rounds
    of ``iters`` iterations each, order rotated every round, with the garbage collector paused."""
    for impl in impls:
        start = time.perf_counter()
        for _ in range(warmup):
            impl.step()
        synchronize(device)
        progress(f"  warm-up {impl.label}: {warmup} iterations, {time.perf_counter() - start:.1f} s")
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        results = interleaved_timings({impl.label: impl.step for impl in impls}, rounds=rounds, iters=iters,
                                      warmup=0, device=device, desc="timing rounds")
    finally:
        if gc_was_enabled:
            gc.enable()
    for impl in impls:
        impl.timing = results[impl.label]


# -------------------------------------------------------------------------------------------- memory
def memory_child(args) -> int:
    """Hidden mode: build one implementation, run warm-up + a few iterations, print the memory used."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name, key, order = args.memory_child, args.workloads[0], args.orders[0]
    peers, skipped = import_peers([name])
    if skipped:
        print(f"{MEMORY_TAG}{json.dumps({'error': skipped[name]})}", flush=True)
        return 1
    accel, _ = import_accel() if name in ("metatut-bf16", "metatut-compile") else (None, "")
    workload = build_workload(key, device, args.seed)
    impl = make_implementation(name, None if name in FLOOR_IMPLS else order, workload, device,
                               peers=peers, accel=accel)
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        baseline = setup_peak = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    else:
        baseline = proc_status_mb("VmRSS") or max_rss_mb()
        setup_peak = peak_rss_mb()
        reset_peak_rss()  # where it works, the peak below is that of the iterations alone
    for _ in range(1 + args.memory_iters):
        impl.step()
    synchronize(device)
    run_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    result = {"baseline_mb": baseline, "peak_mb": max(setup_peak, run_peak), "run_peak_mb": run_peak}
    print(f"{MEMORY_TAG}{json.dumps(result)}", flush=True)
    return 0


def measure_memory(impl: Implementation, workload: Workload, args) -> dict:
    """Run this script as a child process for one implementation; its memory report as a dict."""
    command = [sys.executable, str(Path(__file__).resolve().with_name("bench_peers.py")), "--memory-child", impl.name,
               "--workloads", workload.key, "--orders", impl.order or "second", "--threads", str(args.threads),
               "--device", args.device, "--seed", str(args.seed), "--memory-iters", str(args.memory_iters)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MEMORY_TAG)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        result = {"error": json.loads(lines[-1][len(MEMORY_TAG):]).get("error", tail) if lines else tail}
    else:
        result = json.loads(lines[-1][len(MEMORY_TAG):])
    progress(f"  memory {impl.label}: " + (f"peak {result['peak_mb']:.0f} MB, baseline {result['baseline_mb']:.0f} MB, "
                                           f"peak while iterating {result['run_peak_mb']:.0f} MB"
                                           if "error" not in result else f"failed ({result['error']})")
             + f" ({time.perf_counter() - start:.1f} s)")
    return result

