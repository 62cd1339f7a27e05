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
learn2learn, higher and TorchOpt as their own examples use them, with a plain PyTorch copy of the
same network and the same initial weights; and a floor: ordinary training steps of the same network
on the same images without an inner loop.

Method: a correctness gate first (each meta-gradient against metatut's per-task loop on the same
batch and weights), then warm-up, then rounds in which every implementation runs ``--iters``
iterations in an order rotated each round, all in one process; medians and inter-quartile ranges
over rounds. Peak memory is measured afterwards in a fresh child process per implementation.
Peers that are not installed are skipped (``bash bench/setup_peers.sh`` installs them into
``bench/.peers``, which this script finds by itself).

Example::

    python bench/bench_peers.py                          # all workloads, both orders
    python bench/bench_peers.py --workloads W1 --out bench/out/peers.md
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib
import importlib.metadata
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PEER_PATHS = (BENCH_DIR / ".peers" / "site", BENCH_DIR / ".peers" / "learn2learn-0.2.0")
for _path in PEER_PATHS:  # appended: PYTHONPATH and the environment's own packages take precedence
    if _path.is_dir() and str(_path) not in sys.path:
        sys.path.append(str(_path))

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

try:
    import metatut as mt
except ImportError:  # not installed: use the checkout this script lives in
    sys.path.insert(0, str(BENCH_DIR.parent))
    import metatut as mt

from machine import cpu_model  # bench/machine.py (the script's folder is on sys.path)
from metatut.timing import Timing, interleaved_timings, synchronize

META_LR = 1e-3
WORKLOADS = ("W1", "W2", "W3")
ORDERS = ("second", "first")
METATUT_IMPLS = ("metatut", "metatut-loop", "metatut-workers", "metatut-bf16", "metatut-compile")
PEER_IMPLS = ("learn2learn", "higher", "torchopt")
FLOOR_IMPLS = ("floor-one-batch", "floor-per-task")
ALL_IMPLS = METATUT_IMPLS + PEER_IMPLS + FLOOR_IMPLS
PEER_MODULES = {"learn2learn": "learn2learn", "higher": "higher", "torchopt": "torchopt"}
GATE_RTOL = 1e-4
BF16_GATE = 0.2
#: (warm-up iterations, iterations per round, rounds) per workload, overridable on the command line
DEFAULTS = {"W1": (20, 10, 30), "W2": (2, 1, 5), "W3": (1, 1, 3)}
MEMORY_TAG = "MEMORY-RESULT "


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


def describe(error: BaseException) -> str:
    """``'TypeName: first line of the message'``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def progress(message: str) -> None:
    """A progress line on stderr (the report goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- libraries
def import_quietly(name: str):
    """Import a module with its import-time warnings and prints (gym's notice) silenced."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def import_peers(names) -> tuple[dict, dict]:
    """Import the peers among ``names``: ``({impl: module}, {impl: why it was skipped})``."""
    modules, skipped = {}, {}
    for impl in names:
        if impl not in PEER_MODULES:
            continue
        try:
            modules[impl] = import_quietly(PEER_MODULES[impl])
            if impl == "learn2learn":
                import_quietly("learn2learn.algorithms")
        except Exception as error:  # any import failure: the peer is skipped, not the benchmark
            skipped[impl] = f"import failed: {describe(error)}"
    return modules, skipped


def import_accel():
    """``metatut.accel`` (bf16 autocast, compile), or None with a reason."""
    try:
        return importlib.import_module("metatut.accel"), ""
    except Exception as error:  # a broken or missing module only disables bf16 and compile
        return None, f"metatut.accel unavailable: {describe(error)}"


def library_version(module_name: str, module=None) -> str:
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version(module_name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------------ workloads
@dataclass
class Workload:
    """A MAML problem: network template, loss, inner loop, and a fixed list of meta-batches."""

    key: str
    title: str
    model: nn.Module  # metatut's network; a stateless template for the functional metatut paths
    loss_fn: object
    inner_lr: float
    inner_steps: int
    batches: list
    peer_names: dict[str, str]  # metatut parameter name -> parameter name in the peers' network
    build_peer_net: object      # () -> nn.Module with the same initial weights as ``model``
    defaults: tuple[int, int, int]
    notes: list[str] = field(default_factory=list)

    @property
    def param_names(self) -> list[str]:
        return [name for name, _ in self.model.named_parameters()]


def plain_conv4(source: nn.Module) -> tuple[nn.Sequential, dict[str, str]]:
    """The peers' network: conv4 as one ``nn.Sequential`` (as in their examples), holding a copy of
    ``source``'s weights (a ``metatut.Conv4``); returns it with the metatut -> Sequential name map."""
    layers: list[nn.Module] = []
    channels, hidden = source.in_channels, source.hidden
    names = {}
    for block in range(4):
        first = len(layers)
        layers += [nn.Conv2d(channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden, track_running_stats=False),
                   nn.ReLU(), nn.MaxPool2d(2)]
        for offset in (0, 1):  # 0: convolution, 1: batch norm
            for tensor in ("weight", "bias"):
                names[f"features.{block}.{offset}.{tensor}"] = f"{first + offset}.{tensor}"
        channels = hidden
    layers += [nn.Flatten(), nn.Linear(source.embedding_dim, source.num_classes)]
    for tensor in ("weight", "bias"):
        names[f"head.{tensor}"] = f"{len(layers) - 1}.{tensor}"
    net = nn.Sequential(*layers)
    net.load_state_dict({names[name]: value for name, value in source.state_dict().items()}, strict=True)
    return net, names


def sinusoid_workload(device: torch.device, seed: int) -> Workload:
    model = mt.mlp(seed=seed).to(device)
    generator = mt.make_generator(seed + 1, "cpu")
    batches = [mt.SinusoidTasks().sample(25, 10, 10, generator=generator).to(device) for _ in range(8)]
    return Workload(
        key="W1", title="W1: sinusoid regression, 1-40-40-1 ReLU MLP, meta-batch 25, K = 10 + 10 query, "
                        "1 inner step, alpha = 0.01, MSE",
        model=model, loss_fn=F.mse_loss, inner_lr=0.01, inner_steps=1, batches=batches,
        peer_names={name: name for name, _ in model.named_parameters()},
        build_peer_net=lambda: copy.deepcopy(model), defaults=DEFAULTS["W1"])


_OMNIGLOT_CACHE: dict = {}


def omniglot_batches(device: torch.device, seed: int, count: int = 4) -> tuple[list, str]:
    """``count`` meta-batches of 32 five-way one-shot episodes with 15 queries per class, and where the
    images came from (cached: W2 and W3 share them)."""
    key = (str(device), seed, count)
    if key not in _OMNIGLOT_CACHE:
        from metatut.data import load_omniglot, offline_omniglot_dir
        root = offline_omniglot_dir()
        images = load_omniglot("small", root=root, download=root is None)
        generator = mt.make_generator(seed + 1, "cpu")
        batches = [mt.sample_episodes(images, 32, 5, 1, 15, generator=generator).to(device) for _ in range(count)]
        source = f"{root}" if root is not None else "metatut's data directory (downloaded)"
        _OMNIGLOT_CACHE[key] = batches, f"{len(images)} characters of the 'small' background sets, from {source}"
    return _OMNIGLOT_CACHE[key]


def omniglot_workload(key: str, device: torch.device, seed: int) -> Workload:
    steps = 1 if key == "W2" else 5
    model = mt.conv4(5, seed=seed).to(device)
    template, names = plain_conv4(model)
    template = template.to(device)
    batches, source = omniglot_batches(device, seed)
    return Workload(
        key=key, title=f"{key}: Omniglot 5-way 1-shot, conv4, meta-batch 32, 15 queries per class, "
                       f"{steps} inner step{'s' if steps > 1 else ''}, alpha = 0.4, cross-entropy",
        model=model, loss_fn=F.cross_entropy, inner_lr=0.4, inner_steps=steps,
        batches=batches, peer_names=names, build_peer_net=lambda: copy.deepcopy(template), defaults=DEFAULTS[key],
        notes=[f"images: Omniglot, {source}; {len(batches)} fixed meta-batches used in turn by every implementation"])


def build_workload(key: str, device: torch.device, seed: int) -> Workload:
    return sinusoid_workload(device, seed) if key == "W1" else omniglot_workload(key, device, seed)


# ------------------------------------------------------------------------------------ implementations
class Implementation:
    """One way to run a meta-iteration, with its own copy of the initial weights and its own Adam.

    Subclasses implement :meth:`accumulate` (meta-loss and backward: gradients land in ``.grad`` of
    ``self.parameters``, listed in metatut's parameter order) and call :meth:`finish` in ``__init__``.
    """

    kind = "metatut"  # "metatut", "peer" or "floor"

    def __init__(self, name: str, order: str | None, workload: Workload, device: torch.device):
        self.name, self.order, self.workload, self.device = name, order, workload, device
        self.first_order = order == "first"
        self.timing: Timing | None = None  # seconds per iteration over the rounds (metatut.timing)
        self.iteration = 0
        self.calls = 0
        self.first_call_s: float | None = None
        self.parameters: list[Tensor] = []
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.order} order)" if self.order else self.name

    def finish(self, parameters: list[Tensor]) -> None:
        self.parameters = parameters
        self.optimizer = torch.optim.Adam(parameters, lr=META_LR)

    def accumulate(self, batch) -> None:
        raise NotImplementedError

    def _timed_accumulate(self, batch) -> None:
        if self.calls == 0:  # the first call includes torch.compile's compilation where there is one
            synchronize(self.device)
            start = time.perf_counter()
            self.accumulate(batch)
            synchronize(self.device)
            self.first_call_s = time.perf_counter() - start
        else:
            self.accumulate(batch)
        self.calls += 1

    def step(self) -> None:
        """One meta-iteration on the next batch of the workload's fixed list."""
        batch = self.workload.batches[self.iteration % len(self.workload.batches)]
        self.iteration += 1
        self.optimizer.zero_grad(set_to_none=True)
        self._timed_accumulate(batch)
        self.optimizer.step()

    def meta_gradient(self, batch) -> Tensor:
        """The meta-gradient at the current weights as one float64 vector (no optimiser step)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._timed_accumulate(batch)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                          for p in self.parameters]).double().cpu()
        self.optimizer.zero_grad(set_to_none=True)
        return flat


class MetatutMAML(Implementation):
    """``metatut.maml_loss`` + ``backward`` + Adam over the parameter dict."""

    def __init__(self, name, order, workload, device, *, vectorize="auto", accel=None, precision="float32",
                 compiled=False, task_workers=1, per_task_backward=False):
        super().__init__(name, order, workload, device)
        self.accel, self.precision = accel, precision
        self.params = mt.init_params(workload.model, device=device)
        options = {"inner_lr": workload.inner_lr, "inner_steps": workload.inner_steps,
                   "first_order": self.first_order, "loss_fn": workload.loss_fn, "vectorize": vectorize}
        if task_workers > 1:
            options["task_workers"] = task_workers
        if per_task_backward:
            options["per_task_backward"] = True
        model = workload.model

        def objective(params, batch):
            return mt.maml_loss(model, params, batch, **options)

        if compiled:  # raises ValueError for the combination torch.compile cannot differentiate
            objective = accel.compile_objective(objective, enabled=True, vectorized=mt.prefers_vmap(model),
                                                first_order=self.first_order)
        self.objective = objective
        self.finish(list(self.params.values()))

    def accumulate(self, batch) -> None:
        if self.precision == "float32":
            loss = self.objective(self.params, batch)
        else:
            with self.accel.autocast(self.device, self.precision):
                loss = self.objective(self.params, batch)
        loss.backward()


class PeerMAML(Implementation):
    """Common set-up of the peers: a fresh copy of the plain network with the shared initial weights."""

    kind = "peer"

    def __init__(self, name, order, workload, device, module):
        super().__init__(name, order, workload, device)
        self.lib = module
        self.net = workload.build_peer_net().to(device)
        named = dict(self.net.named_parameters())
        self.finish([named[workload.peer_names[n]] for n in workload.param_names])

    def task(self, batch, t: int):
        return batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]


class Learn2LearnMAML(PeerMAML):
    """``l2l.algorithms.MAML(net, lr, first_order)``: per task ``clone()``, ``adapt(loss)`` per inner step,
    then ``backward()`` of the query loss divided by the number of tasks (as learn2learn's examples do)."""

    def __init__(self, name, order, workload, device, module):
        super().__init__(name, order, workload, device, module)
        self.maml = module.algorithms.MAML(self.net, lr=workload.inner_lr, first_order=self.first_order)

    def accumulate(self, batch) -> None:
        loss_fn = self.workload.loss_fn
        for t in range(batch.num_tasks):
            sx, sy, qx, qy = self.task(batch, t)
            learner = self.maml.clone()
            for _ in range(self.workload.inner_steps):
                learner.adapt(loss_fn(learner(sx), sy))
            query_loss = loss_fn(learner(qx), qy) / batch.num_tasks
            query_loss.backward()  # one backward per task, as learn2learn's examples do: frees the task's graph


class HigherMAML(PeerMAML):
    """``higher.innerloop_ctx(net, SGD, copy_initial_weights=False, track_higher_grads=not first_order)``.

    Second order: per task ``diffopt.step(loss)`` per inner step, then ``backward()`` of the query loss
    divided by the number of tasks (as higher's examples do). First order: with ``track_higher_grads=False`` the adapted weights are detached from the
    initial ones, so the FOMAML gradient is taken by hand: the query loss's gradient at the adapted
    weights, divided by the number of tasks, is added to the initial weights' ``.grad``.
    """

    def __init__(self, name, order, workload, device, module):
        super().__init__(name, order, workload, device, module)
        self.inner_optimizer = torch.optim.SGD(self.net.parameters(), lr=workload.inner_lr)

    def accumulate(self, batch) -> None:
        loss_fn, tasks = self.workload.loss_fn, batch.num_tasks
        initial = list(self.net.parameters())
        for t in range(tasks):
            sx, sy, qx, qy = self.task(batch, t)
            with self.lib.innerloop_ctx(self.net, self.inner_optimizer, copy_initial_weights=False,
                                        track_higher_grads=not self.first_order) as (fnet, diffopt):
                for _ in range(self.workload.inner_steps):
                    diffopt.step(loss_fn(fnet(sx), sy))
                query_loss = loss_fn(fnet(qx), qy)
                if not self.first_order:
                    (query_loss / tasks).backward()  # per task, as higher's examples do
                    continue
                grads = torch.autograd.grad(query_loss, list(fnet.parameters()))
                for p, g in zip(initial, grads, strict=True):
                    if p.grad is None:
                        p.grad = g / tasks
                    else:
                        p.grad.add_(g, alpha=1.0 / tasks)


class TorchOptMAML(PeerMAML):
    """TorchOpt. Second order: the stateful ``torchopt.MetaSGD(net, lr)``, whose ``step(loss)`` keeps the
    graph, with ``extract_state_dict`` / ``recover_state_dict`` around each task (TorchOpt's MAML example).
    First order: ``MetaSGD.step`` always differentiates through the step, so the functional API is
    used: ``torchopt.sgd(lr)`` with ``update`` and ``apply_updates`` on gradients taken without a graph
    (``torch.autograd.grad`` without ``create_graph``), the query loss evaluated with ``functional_call``.
    Both: ``backward()`` of each task's query loss divided by the number of tasks.
    """

    def __init__(self, name, order, workload, device, module):
        super().__init__(name, order, workload, device, module)
        if self.first_order:
            self.inner = module.sgd(lr=workload.inner_lr)
            self.net_names = [n for n, _ in self.net.named_parameters()]
        else:
            self.inner = module.MetaSGD(self.net, lr=workload.inner_lr)

    def accumulate(self, batch) -> None:
        if self.first_order:
            self._first_order(batch)
        else:
            self._second_order(batch)

    def _second_order(self, batch) -> None:
        lib, loss_fn = self.lib, self.workload.loss_fn
        net_state = lib.extract_state_dict(self.net, by="reference", detach_buffers=True)
        inner_state = lib.extract_state_dict(self.inner, by="reference")
        for t in range(batch.num_tasks):
            sx, sy, qx, qy = self.task(batch, t)
            for _ in range(self.workload.inner_steps):
                self.inner.step(loss_fn(self.net(sx), sy))
            (loss_fn(self.net(qx), qy) / batch.num_tasks).backward()  # per task, as TorchOpt's example does
            lib.recover_state_dict(self.net, net_state)
            lib.recover_state_dict(self.inner, inner_state)

    def _first_order(self, batch) -> None:
        lib, loss_fn = self.lib, self.workload.loss_fn
        initial = tuple(self.net.parameters())
        for t in range(batch.num_tasks):
            sx, sy, qx, qy = self.task(batch, t)
            params, state = initial, self.inner.init(initial)
            for _ in range(self.workload.inner_steps):
                support_loss = loss_fn(functional_call(self.net, dict(zip(self.net_names, params, strict=True)), (sx,)), sy)
                grads = torch.autograd.grad(support_loss, params)  # no create_graph: first order
                updates, state = self.inner.update(grads, state, params=params, inplace=False)
                params = tuple(lib.apply_updates(params, updates, inplace=False))
            query_loss = loss_fn(functional_call(self.net, dict(zip(self.net_names, params, strict=True)), (qx,)), qy)
            (query_loss / batch.num_tasks).backward()


class FloorTraining(Implementation):
    """Plain training of the same network on the same images, no inner loop: the cost floor.

    ``per_task=False``: all tasks' support and query examples in one forward pass; ``True``: one
    forward/backward per task, gradients accumulated (divided by the number of tasks). Then Adam.
    """

    kind = "floor"

    def __init__(self, name, workload, device, *, per_task: bool):
        super().__init__(name, None, workload, device)
        self.per_task = per_task
        self.net = copy.deepcopy(workload.model).to(device)
        named = dict(self.net.named_parameters())
        self.finish([named[n] for n in workload.param_names])
        self.examples = {}

    def _examples(self, batch) -> tuple[Tensor, Tensor]:
        key = id(batch)
        if key not in self.examples:
            self.examples[key] = (torch.cat([batch.support_x, batch.query_x], 1),
                                  torch.cat([batch.support_y, batch.query_y], 1))
        return self.examples[key]

    def accumulate(self, batch) -> None:
        x, y = self._examples(batch)
        loss_fn = self.workload.loss_fn
        if self.per_task:
            for t in range(x.shape[0]):
                (loss_fn(self.net(x[t]), y[t]) / x.shape[0]).backward()
        else:
            loss_fn(self.net(x.flatten(0, 1)), y.flatten(0, 1)).backward()


PEER_CLASSES = {"learn2learn": Learn2LearnMAML, "higher": HigherMAML, "torchopt": TorchOptMAML}


def make_implementation(name: str, order: str | None, workload: Workload, device: torch.device, *, peers: dict,
                        accel) -> Implementation:
    """Build one implementation; raises ValueError where the combination cannot run (compile)."""
    if name == "metatut":  # the training command's path: vectorize="auto", each task's graph freed at once
        return MetatutMAML(name, order, workload, device, per_task_backward=True)
    if name == "metatut-loop":
        return MetatutMAML(name, order, workload, device, vectorize=False)
    if name == "metatut-workers":  # the per-task loop in as many threads as intra-op threads were allowed
        workers = torch.get_num_threads()
        if workers < 2 or device.type != "cpu":
            raise ValueError("metatut-workers needs --threads >= 2 on a CPU (it runs tasks in that many threads)")
        return MetatutMAML(name, order, workload, device, vectorize=False, task_workers=workers,
                           per_task_backward=True)
    if name == "metatut-bf16":
        return MetatutMAML(name, order, workload, device, accel=accel, precision="bfloat16", per_task_backward=True)
    if name == "metatut-compile":
        return MetatutMAML(name, order, workload, device, accel=accel, compiled=True)
    if name in PEER_CLASSES:
        return PEER_CLASSES[name](name, order, workload, device, peers[name])
    if name in FLOOR_IMPLS:
        return FloorTraining(name, workload, device, per_task=name == "floor-per-task")
    raise ValueError(f"unknown implementation {name!r}")


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
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", impl.name,
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
