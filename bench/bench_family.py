"""Time one meta-iteration of the MAML family on sinusoids, per algorithm and per CPU thread count.

Usage::

    python bench/bench_family.py                 # 1 and 2 threads, 20 interleaved rounds
    python bench/bench_family.py --threads 1 4 --rounds 50

Each thread count runs in a fresh subprocess (``torch.set_num_threads`` before any work). Inside it, every
round runs one meta-iteration (objective, backward, Adam step) of each algorithm on the same meta-batch of 25
ten-shot tasks, round-robin, and the median over rounds is printed in milliseconds. On a shared 2-core machine
the 1,761-parameter network is much faster with one thread: its matrix products are too small for threads to help,
and oversubscribed threads spin-wait on each other.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, statistics, sys, time
import torch
threads, rounds = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
import metatut as mt

model = mt.mlp(seed=0)
head = mt.final_layer_names(model)


def setup(name):
    params = mt.init_params(model)
    if name == "MAML":
        objective = mt.maml_objective(model, inner_lr=0.01)
    elif name == "first-order MAML":
        objective = mt.maml_objective(model, inner_lr=0.01, first_order=True)
    elif name == "ANIL":
        objective = mt.maml_objective(model, inner_lr=0.01, adapt_names=head)
    elif name == "Meta-SGD":
        params = {**params, **mt.learned_inner_lrs(params, init=0.01)}
        objective = mt.maml_objective(model, inner_lr="learned")
    elif name == "MAML++ (3 steps)":
        params = {**params, **mt.learned_inner_lrs(params, init=0.01, granularity="tensor", steps=3)}
        objective = mt.maml_objective(model, inner_lr="learned", inner_steps=3)
    elif name == "Reptile (5 steps)":
        objective = mt.reptile_objective(model, inner_lr=0.02, inner_steps=5)
    return params, objective, torch.optim.Adam(params.values(), lr=1e-3)


names = ["MAML", "first-order MAML", "ANIL", "Meta-SGD", "MAML++ (3 steps)", "Reptile (5 steps)"]
setups = {n: setup(n) for n in names}
times = {n: [] for n in names}
generator = mt.make_generator(0)
for r in range(rounds + 1):
    batch = mt.SinusoidTasks().sample(25, 10, 10, generator=generator)
    for n, (params, objective, optimizer) in setups.items():
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        objective(params, batch).backward()
        optimizer.step()
        if r:
            times[n].append(time.perf_counter() - start)
print(json.dumps({n: 1e3 * statistics.median(t) for n, t in times.items()}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    results = {}
    for threads in args.threads:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(args.rounds)], capture_output=True,
                             text=True, check=True).stdout
        results[threads] = json.loads(out)
        print(f"{threads} thread(s): measured in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    names = list(next(iter(results.values())))
    header = " | ".join(f"{t} thread(s)" for t in results)
    print(f"| algorithm (ms / meta-iteration, median of {args.rounds}) | {header} |")
    print("| --- | " + " | ".join("---" for _ in results) + " |")
    for n in names:
        print(f"| {n} | " + " | ".join(f"{results[t][n]:.1f}" for t in results) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
