"""The implementations timed by ``bench_peers.py``: metatut's paths, the peers as their own examples use them,
a plain ``torch.func`` vmap implementation, and the plain-training floors."""
from __future__ import annotations

import copy
import time

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from peers_common import FLOOR_IMPLS, META_LR, mt
from peers_workloads import Workload
from metatut.timing import Timing, synchronize


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


class PlainVmapMAML(Implementation):
    """MAML written directly with ``torch.func``: ``vmap`` over tasks of a function that takes
    ``torch.func.grad`` of the support loss (``detach``ed for first order), steps, and returns the query loss;
    then ``backward()`` of the mean (the pattern of TorchOpt's functorch MAML example, no library).

    Refused for networks with batch norm: ``vmap`` through PyTorch's batch norm gives a wrong second-order
    meta-gradient (``bench/RESULTS.md``), so it could not pass the correctness gate.
    """

    kind = "peer"

    def __init__(self, name, order, workload, device):
        super().__init__(name, order, workload, device)
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in workload.model.modules()):
            raise ValueError("plain-vmap: vmap through batch norm gives a wrong second-order meta-gradient")
        self.net = copy.deepcopy(workload.model).to(device)
        self.names = list(workload.param_names)
        named = dict(self.net.named_parameters())
        self.params = {n: named[n] for n in self.names}
        net, loss_fn = self.net, workload.loss_fn
        lr, steps, first_order = workload.inner_lr, workload.inner_steps, self.first_order

        def task_query_loss(params, sx, sy, qx, qy):
            def support_loss(p):
                return loss_fn(functional_call(net, p, (sx,)), sy)
            for _ in range(steps):
                grads = grad(support_loss)(params)
                if first_order:
                    grads = {k: g.detach() for k, g in grads.items()}
                params = {k: params[k] - lr * grads[k] for k in params}
            return loss_fn(functional_call(net, params, (qx,)), qy)

        self.losses = vmap(task_query_loss, in_dims=(None, 0, 0, 0, 0))
        self.finish([self.params[n] for n in self.names])

    def accumulate(self, batch) -> None:
        self.losses(self.params, batch.support_x, batch.support_y, batch.query_x, batch.query_y).mean().backward()



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
    if name == "plain-vmap":
        return PlainVmapMAML(name, order, workload, device)
    if name in PEER_CLASSES:
        return PEER_CLASSES[name](name, order, workload, device, peers[name])
    if name in FLOOR_IMPLS:
        return FloorTraining(name, workload, device, per_task=name == "floor-per-task")
    raise ValueError(f"unknown implementation {name!r}")
