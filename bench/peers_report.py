"""The Markdown report of ``bench_peers.py``: header (machine, versions), one table per workload, the gate."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

from machine import cpu_model  # bench/machine.py (the script's folder is on sys.path)
from peers_common import BF16_GATE, GATE_RTOL, META_LR, PEER_MODULES, library_version, mt
from peers_impls import Implementation
from peers_workloads import Workload


def default_precisions(device: torch.device, accel) -> list[str]:
    if accel is None:
        return ["float32"]
    if device.type == "cuda":  # no CPU capability check on a GPU
        return ["float32", "bfloat16"]
    return ["float32", "bfloat16"] if accel.bf16_supported("cpu") else ["float32"]


def settings(workload: Workload, args) -> tuple[int, int, int]:
    warmup, iters, rounds = workload.defaults
    return (warmup if args.warmup is None else args.warmup, iters if args.iters is None else args.iters,
            rounds if args.rounds is None else args.rounds)


def header_lines(device: torch.device, peers: dict, precisions: list[str]) -> list[str]:
    try:
        cores = f"{len(os.sched_getaffinity(0))} usable of {os.cpu_count()} logical cores"
    except AttributeError:
        cores = f"{os.cpu_count()} logical cores"
    versions = ", ".join(f"{name} {library_version(PEER_MODULES[name], module)}" for name, module in peers.items())
    lines = [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- CPU: {cpu_model()} ({cores})",
        f"- device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"- Python {platform.python_version()}, torch {torch.__version__}, metatut {mt.__version__}",
        f"- peers: {versions or 'none importable'}",
        f"- torch threads: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op",
        f"- dtype: float32 parameters and data; precisions run: {', '.join(precisions)}",
        f"- meta-optimiser: Adam, lr {META_LR:g}, in every implementation",
    ]
    return lines


# -------------------------------------------------------------------------------------------- report
def workload_report(workload: Workload, impls: list[Implementation], gate: dict, memory: dict, skipped: list[str],
                    timing: tuple[int, int, int], device: torch.device, loads: tuple[str, str]) -> list[str]:
    warmup, iters, rounds = timing
    medians = {impl: impl.timing.median for impl in impls if impl.timing}
    floor = next((impl for impl in impls if impl.name == "floor-per-task" and impl.timing), None)
    memory_unit = "peak CUDA MB" if device.type == "cuda" else "peak RSS MB"
    method = (f"Warm-up: {warmup} iteration(s) per implementation; then {rounds} round(s) of {iters} iteration(s) "
              f"per implementation, interleaved round-robin (order rotated each round); median and IQR over rounds. "
              f"Load average (1/5/15 min) {loads[0]} before, {loads[1]} after.")
    columns = ("| implementation | order | median ms/iter | IQR (ms) | fastest peer / this | this / floor-per-task "
               f"| {memory_unit} | peak − baseline MB |")
    lines = [f"### {workload.title}", "", method, "", columns, "| --- | --- |" + " ---: |" * 6]
    for impl in impls:
        if not impl.timing:
            continue
        q1, q2, q3 = (1e3 * q for q in (impl.timing.q1, impl.timing.median, impl.timing.q3))
        peers_here = [medians[p] for p in impls if p.kind == "peer" and p.order == impl.order and p in medians]
        fastest = f"{min(peers_here) / medians[impl]:.2f}x" if peers_here and impl.kind != "floor" else "–"
        versus_floor = f"{medians[impl] / medians[floor]:.2f}x" if floor is not None else "–"
        mem = memory.get(impl)
        if mem is None:
            peak = delta = "–"
        elif "error" in mem:
            peak, delta = "failed", "–"
        else:
            peak, delta = f"{mem['peak_mb']:.0f}", f"{mem['run_peak_mb'] - mem['baseline_mb']:.0f}"
        lines.append(f"| {impl.name} | {impl.order or '–'} | {q2:.2f} | {q1:.2f} - {q3:.2f} | {fastest} | "
                     f"{versus_floor} | {peak} | {delta} |")
    gate_title = ("Correctness gate (meta-gradient on the first batch, same initial weights, against metatut-loop: "
                  f"global relative error ||g - g_ref|| / ||g_ref||; limit {GATE_RTOL:g}, bf16 {BF16_GATE:g}):")
    lines += ["", gate_title, ""]
    for impl, result in gate.items():
        if result.reference:
            lines.append(f"- {impl.label}: reference")
            continue
        verdict = "pass" if result.passed else "**FAILED: excluded from timing**"
        detail = result.error or f"relative error {result.relative_error:.2e}, cosine {result.cosine:.6f}"
        lines.append(f"- {impl.label}: {detail}: {verdict}")
    notes = list(workload.notes)
    for impl in impls:
        if impl.name == "metatut-compile" and impl.first_call_s is not None:
            notes.append(f"{impl.label}: first call (compilation included, not timed) {impl.first_call_s:.1f} s")
    for impl in impls:
        mem = memory.get(impl)
        if mem is not None and "error" in mem:
            notes.append(f"memory child for {impl.label} failed: {mem['error']}")
    notes += skipped
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return lines + [""]


def emit(report: list[str], lines: list[str], out: Path | None) -> None:
    """Print ``lines`` and append them to the report (rewritten to ``out`` each time)."""
    print("\n".join(lines), flush=True)
    report.extend(lines)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(report) + "\n", encoding="utf-8")

