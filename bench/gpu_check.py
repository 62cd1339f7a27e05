"""One prepared command for a machine with a GPU: is MAML correct and fast where users feel it?

    python bench/gpu_check.py                      # the chosen device (CUDA, else MPS, else CPU), under 8 minutes
    python bench/gpu_check.py --bf16 --budget-s 90 # also bf16 autocast; 90 s of training per path
    python bench/gpu_check.py --quick --device cpu # tiny sizes, under a minute (the test-suite runs this)

Writes a Markdown report (``--out``, default ``bench/out/gpu.md``) with three parts:

1. correctness: the meta-gradient on the device (float32; bf16 autocast with ``--bf16``) for each path (batched:
   all tasks at once under vmap; loop: one task at a time) against the float64 CPU per-task loop on the same batch,
   one line per path with its relative error;
2. speed: the median ms per meta-iteration (``metatut.timing.interleaved_timings``) of the batched path, the
   loop, learn2learn (if importable) and the plain-training floor (one forward/backward of conv4 on all the
   meta-batch's query images), on Omniglot-sized conv4 5-way and 20-way 1-shot, meta-batch 32, 1 and 5 inner
   steps, both orders; the peak GPU memory of each row on CUDA (``torch.cuda.max_memory_allocated``);
3. time to quality: a short real training run on the small offline Omniglot sets (5-way 1-shot) through the
   training command's pieces, for each path, and the held-out accuracy after ``--budget-s`` seconds of training.
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from peers_common import import_peers, mt  # noqa: E402  (metatut from the checkout when not installed)

from metatut import accel  # noqa: E402
from metatut.timing import interleaved_timings, synchronize  # noqa: E402

INNER_LR = 0.4
QUERY = 5           # query images per class in the speed and correctness batches


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda | mps | cpu (default: the best available)")
    parser.add_argument("--out", default=str(BENCH_DIR / "out" / "gpu.md"), help="the report (Markdown)")
    parser.add_argument("--bf16", action="store_true", help="also check and time bf16 autocast")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (hidden 8, meta-batch 4, 3 rounds, 10 s of training, no peers)")
    parser.add_argument("--budget-s", type=float, default=None, help="training seconds per path (default 60; "
                        "--quick: 10 s, batched path only)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 7; --quick: 2)")
    parser.add_argument("--hidden", type=int, default=None, help="conv4 filters (default 64; --quick: 8)")
    parser.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-batch (default 32; --quick: 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    args.budget_s = args.budget_s if args.budget_s is not None else (10.0 if quick else 60.0)
    args.rounds = args.rounds if args.rounds is not None else (2 if quick else 7)
    args.hidden = args.hidden if args.hidden is not None else (8 if quick else 64)
    args.meta_batch = args.meta_batch if args.meta_batch is not None else (4 if quick else 32)
    args.device = torch.device(args.device) if args.device else mt.pick_device()
    return args


def episodes(tasks: int, n_way: int, device, dtype=torch.float32, seed: int = 0) -> mt.TaskBatch:
    """Omniglot-shaped 1-shot episodes of sparse binary "ink" (28x28; speed does not depend on the strokes)."""
    g = torch.Generator().manual_seed(seed)
    sx = (torch.rand(tasks, n_way, 1, 28, 28, generator=g) > 0.8).to(dtype)
    qx = (torch.rand(tasks, n_way * QUERY, 1, 28, 28, generator=g) > 0.8).to(dtype)
    sy = torch.arange(n_way).expand(tasks, -1).contiguous()
    qy = torch.arange(n_way).repeat(QUERY).expand(tasks, -1).contiguous()
    return mt.TaskBatch(sx, sy, qx, qy).to(device)


def flat_meta_gradient(model, params, batch, **options) -> torch.Tensor:
    loss = mt.maml_loss(model, params, batch, inner_lr=INNER_LR, loss_fn=F.cross_entropy, **options)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(params.values()))])


# ------------------------------------------------------------------------------------------- 1. correctness
def correctness(args, lines: list[str]) -> None:
    device = args.device
    tasks = min(args.meta_batch, 8)
    model64 = mt.conv4(5, hidden=args.hidden, seed=args.seed).double()
    params64 = mt.init_params(model64)
    batch = episodes(tasks, 5, "cpu", torch.float64, seed=args.seed)
    reference = flat_meta_gradient(model64, params64, batch, vectorize=False)
    model = copy.deepcopy(model64).float().to(device)
    params = mt.init_params(model)
    batch32 = batch.to(device, torch.float32)
    precisions = ["float32"] + (["bfloat16"] if args.bf16 else [])
    lines += ["## 1. Correctness", "",
              f"conv4 (hidden {args.hidden}), {tasks} tasks of 5-way 1-shot, {QUERY} queries per class, one inner "
              f"step of {INNER_LR}, second order; reference: the float64 per-task loop on the CPU, same batch and "
              "weights.", ""]
    for precision in precisions:
        for path, vectorize in (("batched", True), ("loop", False)):
            with accel.autocast(device.type, precision):
                got = flat_meta_gradient(model, params, batch32, vectorize=vectorize).double().cpu()
            error = ((got - reference).norm() / reference.norm()).item()
            lines.append(f"- {path} ({precision} on {device.type}): relative error {error:.2e}")
    lines.append("")


# ------------------------------------------------------------------------------------------------ 2. speed
def learn2learn_step(args, model, n_way: int, steps: int, order: str, batch):
    """learn2learn's MAML as its examples use it (bench/peers_impls.py), or None with the reason."""
    modules, skipped = import_peers(["learn2learn"])
    if "learn2learn" not in modules:
        return None, skipped.get("learn2learn", "not importable")
    from peers_impls import Learn2LearnMAML
    from peers_workloads import Workload, plain_conv4

    template, names = plain_conv4(model)
    workload = Workload(key="gpu", title="", model=model, loss_fn=F.cross_entropy, inner_lr=INNER_LR,
                        inner_steps=steps, batches=[batch], peer_names=names,
                        build_peer_net=lambda: copy.deepcopy(template), defaults=(1, 1, 1))
    impl = Learn2LearnMAML("learn2learn", order, workload, args.device, modules["learn2learn"])
    return impl.step, ""


def speed(args, lines: list[str]) -> None:
    device = args.device
    cuda = device.type == "cuda"
    rows = []
    skipped_peer = ""
    for n_way in (5, 20):
        batch = episodes(args.meta_batch, n_way, device, seed=args.seed + n_way)
        for steps in (1, 5):
            for order in ("second", "first"):
                model = mt.conv4(n_way, hidden=args.hidden, seed=args.seed).to(device)
                fns = {}

                def maml(vectorize, precision="float32", model=model, steps=steps, order=order, batch=batch):
                    params = mt.init_params(model)
                    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
                    extra = {} if vectorize else {"per_task_backward": True}

                    def step():
                        optimizer.zero_grad(set_to_none=True)
                        with accel.autocast(device.type, precision):
                            loss = mt.maml_loss(model, params, batch, inner_lr=INNER_LR, inner_steps=steps,
                                                first_order=order == "first", loss_fn=F.cross_entropy,
                                                vectorize=vectorize, **extra)
                        loss.backward()
                        optimizer.step()
                    return step
                fns["batched"] = maml(True)
                fns["loop"] = maml(False)
                if args.bf16:
                    fns["batched bf16"] = maml(True, "bfloat16")
                if not args.quick:
                    l2l, why = learn2learn_step(args, model, n_way, steps, order, batch)
                    if l2l is not None:
                        fns["learn2learn"] = l2l
                    else:
                        skipped_peer = why

                def floor(model=model, batch=batch):
                    params = mt.init_params(model)
                    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
                    x = batch.query_x.flatten(0, 1)
                    y = batch.query_y.flatten(0, 1)

                    def step():
                        optimizer.zero_grad(set_to_none=True)
                        F.cross_entropy(torch.func.functional_call(model, params, (x,)), y).backward()
                        optimizer.step()
                    return step
                fns["floor (plain training)"] = floor()
                timings = interleaved_timings(fns, rounds=args.rounds, iters=1, warmup=1, device=device)
                for name, fn in fns.items():
                    memory = "–"
                    if cuda:
                        synchronize(device)
                        torch.cuda.reset_peak_memory_stats(device)
                        fn()
                        synchronize(device)
                        memory = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
                    rows.append((f"{n_way}-way", steps, order, name, timings[name].median * 1e3, memory))
    lines += ["## 2. Speed", "",
              f"Median ms per meta-iteration (meta-loss, backward, Adam step) over {args.rounds} interleaved rounds; "
              f"conv4 hidden {args.hidden}, 28x28 images, meta-batch {args.meta_batch}, 1-shot, {QUERY} queries per "
              f"class, inner step {INNER_LR}. batched: all tasks at once (vmap, TaskBatchNorm2d exact); loop: one "
              "task at a time (per-task backward, as the training command); floor: one forward/backward of plain "
              "training on the same query images. Peak memory: CUDA only.", "",
              "| workload | inner steps | order | path | median ms | peak GPU memory |",
              "| --- | ---: | --- | --- | ---: | ---: |"]
    lines += [f"| {w} | {s} | {o} | {name} | {ms:.1f} | {mem} |" for w, s, o, name, ms, mem in rows]
    if args.quick:
        lines.append("\n(learn2learn not timed: --quick)")
    elif skipped_peer:
        lines.append(f"\n(learn2learn not timed: {skipped_peer})")
    lines.append("")


# ---------------------------------------------------------------------------------------- 3. time to quality
def time_to_quality(args, lines: list[str]) -> None:
    from metatut.data import offline_omniglot_dir
    from metatut.run.build import build, evaluate, execution_path, make_model, omniglot_split
    from metatut.run.config import TrainConfig

    lines += ["## 3. Time to quality", ""]
    if offline_omniglot_dir() is None:
        lines += ["(skipped: the small offline Omniglot sets are not here: metatut.data.offline_omniglot_dir())", ""]
        return
    device = args.device
    cfg = TrainConfig(task="omniglot", dataset="small", n_way=5, shots=1, query=QUERY, width=args.hidden,
                      meta_batch=args.meta_batch, inner_lr=INNER_LR, inner_steps=1, eval_inner_steps=3,
                      eval_tasks=50 if args.quick else 200, seed=args.seed, device=device.type,
                      progress=False).resolved()
    chosen = execution_path(cfg, make_model(cfg), device)
    paths = ["batched"] if args.quick else ["batched", "loop"]
    lines += [f"5-way 1-shot on the small offline Omniglot sets (the training command's model, data and "
              f"evaluation), conv4 hidden {args.hidden}, meta-batch {args.meta_batch}, one inner step; "
              f"{args.budget_s:g} s of training per path, then the held-out accuracy ({cfg.eval_tasks} tasks, "
              f"{cfg.eval_inner_steps} inner steps). The training command chooses '{chosen}' on {device.type}.", "",
              "| path | meta-iterations | held-out accuracy |", "| --- | ---: | ---: |"]
    for path in paths:
        torch.manual_seed(args.seed)
        parts = build(cfg, device, make_model(cfg), omniglot_split)
        optimizer = torch.optim.Adam(parts.params.values(), lr=cfg.meta_lr)
        generator = mt.make_generator(args.seed, device)
        iterations, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.budget_s:
            batch = parts.sample(cfg.meta_batch, generator)
            optimizer.zero_grad(set_to_none=True)
            mt.maml_loss(parts.model, parts.params, batch, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps,
                         loss_fn=parts.loss_fn, vectorize=path == "batched",
                         **({} if path == "batched" else {"per_task_backward": True})).backward()
            optimizer.step()
            synchronize(device)
            iterations += 1
        score = evaluate(cfg, parts, device)
        lines.append(f"| {path} | {iterations} | {score['eval_accuracy']:.3f} ± {score['eval_accuracy_ci95']:.3f} |")
    lines.append("")


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = args.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    lines = ["# GPU check", "",
             f"device: {device} ({name}); torch {torch.__version__}; metatut {getattr(mt, '__version__', '?')}; "
             f"CPU threads {torch.get_num_threads()}; {'--quick' if args.quick else 'full sizes'}; "
             f"'auto' picks the {'batched' if mt.prefers_vmap(mt.conv4(5, hidden=4), device=device) else 'loop'} "
             f"path for conv4 on {device.type}.", ""]
    for part in (correctness, speed, time_to_quality):
        part_start = time.perf_counter()
        part(args, lines)
        print(f"{part.__name__}: {time.perf_counter() - part_start:.1f} s", file=sys.stderr, flush=True)
    lines.append(f"Total: {time.perf_counter() - started:.0f} s.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
