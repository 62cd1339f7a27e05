r"""Checkers for the course exercises: call one on your function and get a hint when it is wrong.

::

    from metatut.checks import check_inner_step
    check_inner_step(inner_step)     # ✔ check_inner_step passed: ...

Each checker runs the learner's function on a tiny seeded fixture (a small MLP and a few sinusoid
tasks, float64, CPU, well under a second) and compares it with the reference implementation in
:mod:`metatut.functional` using :func:`torch.testing.assert_close`: the value *and* the gradient with
respect to the parameters (a first-order implementation has the right value but the wrong
gradient). It also checks the output's type and shape and that the inputs were not modified.

A mistake raises :class:`CheckFailed` (an ``AssertionError``): the first line of its message says what
is wrong, the second starts with ``Hint:`` and, where the checker recognises the mistake, says how to fix
it. Jupyter shows that message alone, not a traceback through this module (:meth:`CheckFailed._render_traceback_`);
when the learner's function raised, the message ends with the learner's own lines (``Cell In[n], line k``)
and the error's last line. Success prints exactly one line.

Numbers a learner might hard-code vary between the fixtures: the inner step size (0.1 and 0.037) and
the number of shots.

The exercise functions take the model as a pure function ``f(params, x)``
(:func:`metatut.functional_model`) and parameters as a dict ``{name: tensor}``:

* ``summed_task_loss(f, params, x, y)``: ``x, y [tasks, shots, 1]`` -> 0-dim tensor;
* ``inner_step(f, params, x, y, inner_lr, create_graph)``: ``x, y [shots, 1]`` -> new dict;
* ``maml_loss(f, params, batch, inner_lr)``: ``batch`` a :class:`metatut.TaskBatch` -> 0-dim tensor.
"""
from __future__ import annotations

import functools
import sys
import sysconfig
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional
from ..models import Params, functional_model, init_params, mlp
from ..tasks import SinusoidTasks, TaskBatch

__all__ = ["CheckFailed", "check_summed_task_loss", "check_inner_step", "check_maml_loss"]

_DTYPE = torch.float64
_RTOL, _ATOL = 1e-6, 1e-9


class CheckFailed(AssertionError):
    """Raised by a checker. The message's first line says what is wrong, the second gives a hint.

    Jupyter (IPython) shows only the message, not the traceback through the checker's own code (see
    :meth:`_render_traceback_`); elsewhere the traceback is cut to the checker's entry point. When the
    learner's function raised, the message ends with where in their code and the error's last line, and
    the error itself is :attr:`learner_error`.
    """

    learner_error: BaseException | None = None

    def _render_traceback_(self) -> list[str]:
        """What IPython and Jupyter show for this exception instead of a traceback: the message alone."""
        lines = str(self).splitlines() or [type(self).__name__]
        return ["✘ " + lines[0], *lines[1:]]


def _checker(check: Callable[[Callable], None]) -> Callable[[Callable], None]:
    """Mark a public checker: a failure is raised with its traceback cut to the checker's entry point."""
    @functools.wraps(check)
    def run(fn: Callable) -> None:
        __tracebackhide__ = True  # noqa: F841 (pytest hides this frame)
        try:
            return check(fn)
        except CheckFailed as failure:
            raise failure.with_traceback(None) from None
    return run


# ------------------------------------------------------------------------------------------ fixtures
@dataclass(frozen=True)
class _Fixture:
    model: nn.Module
    f: Callable[[Params, Tensor], Tensor]
    params: Params
    batch: TaskBatch


def _fixture(seed: int, tasks: int, shots: int, query_shots: int) -> _Fixture:
    """A seeded 1-16-16-1 MLP (float64 parameters that require grad) and a sinusoid task batch."""
    with torch.random.fork_rng(devices=[]):  # nn.Linear's default init draws from the global RNG first
        model = mlp(1, (16, 16), 1, seed=seed)
    params = init_params(model, dtype=_DTYPE)
    generator = torch.Generator().manual_seed(seed)
    batch = SinusoidTasks().sample(tasks, shots, query_shots, generator=generator, dtype=_DTYPE)
    return _Fixture(model, functional_model(model), params, batch)


def _projection(params: Params, seed: int) -> Params:
    """Fixed random weights ``w`` for the scalar probe ``sum_k <w_k, theta'_k>``."""
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator, dtype=_DTYPE) for k, v in params.items()}


# ------------------------------------------------------------------------------------------- helpers
def _fail(check: str, message: str, details: str | None = None) -> CheckFailed:
    """The failure: ``check failed: message`` on the first line, ``details`` (which start with the hint) below."""
    text = f"{check} failed: {message}"
    if details:
        text += "\n" + details
    return CheckFailed(text)


def _error_hint(err: Exception) -> str:
    text = str(err)
    if "in-place" in text or "inplace" in text:
        return ("Hint: do not modify params in place (`-=`, `.sub_()`, `params[k] = ...`); "
                "build and return a new dict, e.g. {k: p - inner_lr * g ...}.")
    if "does not require grad" in text or "does not have a grad_fn" in text:
        return ("Hint: compute the loss from params with autograd on: no torch.no_grad(), .detach(), "
                ".item() or numpy on the way.")
    if "size of tensor" in text or "shape" in text or "dimension" in text:
        return "Hint: check the shapes; print x.shape and f(params, x).shape."
    return ("Hint: the checker called your function with valid inputs; your error and the line of your code "
            "that raised it are below.")


def _library_dirs() -> tuple[str, ...]:
    """Folders whose frames are not the learner's code: metatut, torch, the standard library, installed packages."""
    dirs = {str(Path(__file__).resolve().parent.parent), str(Path(torch.__file__).resolve().parent)}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        if sysconfig.get_paths().get(key):
            dirs.add(str(Path(sysconfig.get_paths()[key]).resolve()))
    return tuple(dirs)


def _code_name(filename: str) -> str:
    """``Cell In[5]`` for a Jupyter cell (as IPython's tracebacks say), otherwise ``File "path"``."""
    if "IPython" in sys.modules:
        try:
            shell = sys.modules["IPython"].get_ipython()
            named = shell.compile.format_code_name(filename) if shell is not None else None
            if named:
                return f"{named[0]} {named[1]}"
        except Exception:  # an old IPython or an unusual shell: fall back to the file name
            pass
    return f'File "{filename}"'


def _where(err: BaseException, limit: int = 3) -> list[str]:
    """The learner's own frames of ``err``'s traceback (innermost last, at most ``limit``) and its last line."""
    library = _library_dirs()
    frames = []
    for frame in traceback.extract_tb(err.__traceback__):
        try:
            path = str(Path(frame.filename).resolve())
        except (OSError, ValueError):
            path = frame.filename
        if not path.startswith(library):
            frames.append(frame)
    lines = []
    if frames:
        lines.append("In your code:")
        for frame in frames[-limit:]:
            lines.append(f"  {_code_name(frame.filename)}, line {frame.lineno}, in {frame.name}")
            if frame.line:
                lines.append(f"    {frame.line.strip()}")
    last = "".join(traceback.format_exception_only(type(err), err)).strip().splitlines()
    if len(last) > 8:
        last = last[:7] + ["..."]
    return lines + last


def _call(check: str, fn: Callable, *args, hint: Callable[[Exception], str] = _error_hint):
    """Call the learner's function; turn its exceptions into CheckFailed with ``hint(err)``.

    The failure shows the hint first, then where in the learner's code the error was raised and its last
    line; the error itself is the failure's ``learner_error`` (not chained: Python would print the whole
    traceback through the checker again).
    """
    try:
        return fn(*args)
    except NotImplementedError:
        raise _fail(check, "implement the function first: replace `# YOUR CODE HERE` and the "
                           "`raise NotImplementedError()` line with your code, run that cell, "
                           "then run this check again.") from None
    except CheckFailed:
        raise
    except Exception as err:  # the learner's bug: the hint, then where it happened
        failure = _fail(check, f"your function raised {type(err).__name__}.",
                        hint(err) + "\n\n" + "\n".join(_where(err)))
        failure.learner_error = err
    raise failure from None


def _snapshot(tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    return {k: (v, v.detach().clone()) for k, v in tensors.items()}


def _expect_unchanged(check: str, what: str, current: dict[str, Tensor], snapshot) -> None:
    if set(current) != set(snapshot):
        raise _fail(check, f"your function added or removed entries of {what}.",
                    "Hint: leave the inputs alone; build and return a new dict.")
    for k, (original, values) in snapshot.items():
        if current[k] is not original:
            raise _fail(check, f"your function replaced {what}[{k!r}] with a new tensor.",
                        "Hint: `params[k] = ...` changes the caller's dict; build a new dict instead, "
                        "e.g. {k: p - inner_lr * g for ...}.")
        if not torch.equal(current[k].detach(), values):
            raise _fail(check, f"your function modified {what}[{k!r}] in place.",
                        "Hint: no `-=`, `.sub_()`, `.copy_()` or `.data` updates; compute new tensors "
                        "(e.g. p - inner_lr * g) and return them in a new dict.")


def _expect_param_dict(check: str, out, params: Params, example: str, *, name: str = "out",
                       shape_hint: str | None = None) -> Params:
    """``out`` with the keys of ``params``, in the order of ``params`` (any order is accepted), else CheckFailed
    (``name``: how the message calls the result; ``shape_hint``: the hint for a wrongly shaped entry)."""
    if not isinstance(out, dict):
        raise _fail(check, f"expected a dict {{name: tensor}}, got {type(out).__name__}.",
                    f"Hint: build and return a new dict with the keys of params, e.g. {example}.")
    if set(out) != set(params):
        raise _fail(check, f"expected the keys {sorted(params)}, got {sorted(map(str, out))}.",
                    "Hint: keep the same names as params, one entry for each.")
    out = {k: out[k] for k in params}
    for k, v in out.items():
        if not isinstance(v, Tensor) or v.shape != params[k].shape:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            if isinstance(v, Tensor) and v.dim() == params[k].dim() + 1:
                hint = "one value per task: did you forget to average over the task dimension, dim 0?"
            else:
                hint = shape_hint or f"each entry must have the shape of params[k], e.g. {example}."
            raise _fail(check, f"{name}[{k!r}] should be a tensor of shape {tuple(params[k].shape)}, got {got}.",
                        f"Hint: {hint}")
    return out


def _batch_tensors(batch: TaskBatch) -> dict[str, Tensor]:
    return {n: getattr(batch, n) for n in ("support_x", "support_y", "query_x", "query_y")}


def _close(actual: Tensor, expected: Tensor) -> bool:
    actual = actual.detach()
    return actual.shape == expected.shape and torch.allclose(actual.to(_DTYPE), expected.detach().to(_DTYPE),
                                                               rtol=_RTOL, atol=_ATOL)


def _mismatch(check: str, actual: Tensor, expected: Tensor, message: str, hint: str) -> CheckFailed:
    """The CheckFailed for values that are not close, with torch.testing.assert_close's report.

    Checkers decide with :func:`_close` (the same criterion and tolerances) because the first call
    of ``assert_close`` imports ``torch.distributed.tensor`` (about 2 s): passing checks stay fast.
    """
    try:
        torch.testing.assert_close(actual.detach().to(_DTYPE), expected.detach().to(_DTYPE),
                                   rtol=_RTOL, atol=_ATOL)
    except AssertionError as err:
        return _fail(check, message, f"{hint}\n\n{err}")
    return _fail(check, message, hint)


def _first_match(value: Tensor, candidates: list[tuple[Tensor, str]]) -> str | None:
    for candidate, hint in candidates:
        if _close(value, candidate):
            return hint
    return None


def _expect_scalar_tensor(check: str, out, per_task_shape: tuple[int, ...], full_shape: tuple[int, ...]) -> None:
    if not isinstance(out, Tensor):
        hint = ("Hint: did you call .item() or float()? That also cuts the gradient: return the tensor itself."
                if isinstance(out, (int, float)) else
                "Hint: return the loss tensor itself (no .item(), no list, no tuple).")
        raise _fail(check, f"expected a 0-dim torch.Tensor, got {type(out).__name__}.", hint)
    if tuple(out.shape) == per_task_shape:
        raise _fail(check, f"you returned one loss per task (shape {tuple(out.shape)}); "
                           "the function must return a single number.",
                    "Hint: reduce over the task dimension as the formula says.")
    if tuple(out.shape) == full_shape:
        raise _fail(check, f"you returned the per-example errors (shape {tuple(out.shape)}); reduce them to "
                           "a single number.", "Hint: average over each task's examples, then reduce over tasks "
                                               "as the formula says.")
    if out.dim() != 0:
        raise _fail(check, f"expected a 0-dim tensor (a scalar), got shape {tuple(out.shape)}.",
                    "Hint: .mean() and .sum() without a dim return a 0-dim tensor; "
                    ".squeeze() removes size-1 dims.")
    if not out.is_floating_point():
        raise _fail(check, f"expected a floating-point tensor, got {out.dtype}.",
                    "Hint: compute the loss with floating-point operations on f(params, x); no rounding or casts.")


def _gradients(check: str, out: Tensor, params: Params, what: str) -> list[Tensor]:
    """d out / d params (zeros where a parameter is unused); CheckFailed if out has no graph."""
    if not out.requires_grad:
        raise _fail(check, f"{what} is not connected to params: no gradient can reach the parameters.",
                    "Hint: compute it from params with autograd on; no torch.no_grad(), .detach(), .item(), "
                    ".data or numpy on the way.")
    grads = torch.autograd.grad(out, list(params.values()), allow_unused=True)
    if all(g is None for g in grads):
        raise _fail(check, f"{what} does not depend on params: it was built from copies cut off from them.",
                    "Hint: use the tensors in params directly; no .detach(), .clone().requires_grad_() "
                    "or torch.tensor(...) re-wrapping.")
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads, strict=True)]


def _flat(tensors) -> Tensor:
    return torch.cat([t.detach().reshape(-1).to(_DTYPE) for t in tensors])


def _mse_grad(f, params: Params, x: Tensor, y: Tensor, *, reduction: str = "mean",
              create_graph: bool = False) -> list[Tensor]:
    with torch.enable_grad():
        loss = F.mse_loss(f(params, x), y, reduction=reduction)
        return list(torch.autograd.grad(loss, list(params.values()), create_graph=create_graph))


def _step(params: Params, grads: list[Tensor], lr: float) -> Params:
    return {k: p - lr * g for (k, p), g in zip(params.items(), grads, strict=True)}


# ------------------------------------------------------------------------------ 1. summed task loss
@_checker
def check_summed_task_loss(fn: Callable) -> None:
    r"""Check ``fn(f, params, x, y)`` = :math:`\sum_t \frac{1}{K}\sum_k (f(\theta, x_{tk}) - y_{tk})^2`.

    ``x, y [tasks, shots, 1]``; the result must be a 0-dim tensor, differentiable w.r.t. ``params``.
    Reference: :func:`metatut.summed_task_loss` with ``reduction='sum'`` on the given examples.
    """
    check = "check_summed_task_loss"
    shapes = ((0, 3, 5), (1, 2, 4))
    for seed, tasks, shots in shapes:
        fx = _fixture(seed, tasks, shots, shots)
        x, y = fx.batch.support_x, fx.batch.support_y
        before_params, before_xy = _snapshot(fx.params), _snapshot({"x": x, "y": y})
        out = _call(check, fn, fx.f, fx.params, x, y)
        _expect_unchanged(check, "params", fx.params, before_params)
        _expect_unchanged(check, "the data", {"x": x, "y": y}, before_xy)
        _expect_scalar_tensor(check, out, (tasks,), tuple(x.shape))

        reference = functional.summed_task_loss(fx.model, fx.params, TaskBatch(x, y, x, y), use="support",
                                                reduction="sum", vectorize=False)
        if not _close(out, reference):
            with torch.no_grad():
                r = fx.f(fx.params, x) - y                                   # [tasks, shots, 1]
                mse = (r ** 2).mean(dim=(1, 2))                              # [tasks]
                candidates = [
                    (mse.mean(), f"your loss is {tasks}x too small: sum over tasks (you averaged over them), "
                                 "average over shots."),
                    ((r ** 2).sum(), f"your loss is {shots}x too large: average over shots (each task's loss "
                                     "is a mean squared error), then sum over tasks."),
                    ((r ** 2).sum(dim=(1, 2)).mean(), "you summed over shots and averaged over tasks: it is the "
                                                      "other way round (mean over shots, sum over tasks)."),
                    (r.abs().mean(dim=(1, 2)).sum(), "this looks like the absolute error: square the residual, "
                                                     "(f(params, x) - y) ** 2."),
                    (mse.sqrt().sum(), "you took a square root: use each task's mean squared error, "
                                       "not its RMSE."),
                    (r.mean(dim=(1, 2)).sum(), "you forgot to square the residual (f(params, x) - y)."),
                ]
            hint = _first_match(out, candidates) or ("compute each task's mean squared error "
                                                     "(mean over its shots), then sum over tasks.")
            raise _mismatch(check, out, reference, f"the value is wrong (expected {reference.item():.6f}, "
                                                   f"got {out.item():.6f}).", f"Hint: {hint}")
        grads = _gradients(check, out, fx.params, "your loss")
        expected = torch.autograd.grad(reference, list(fx.params.values()))
        if not _close(_flat(grads), _flat(expected)):
            raise _mismatch(check, _flat(grads), _flat(expected), "the value matches but the gradient does not.",
                            "Hint: compute the loss with differentiable torch operations on f(params, x); "
                            "do not detach any part of it.")
    print(f"✔ {check} passed: value and gradient match the reference "
          f"(sum over tasks of the per-task MSE) on {len(shapes)} task batches.")


# ------------------------------------------------------------------------------------ 2. inner step
def _fitted_step_hint(got: Tensor, theta: Tensor, step: Tensor, lr: float, shots: int,
                      name: str = "inner_lr") -> str | None:
    """A hint when ``got = theta - c * step`` for a constant ``c`` other than ``lr``: a number was hard-coded.

    ``step`` is the update direction that ``lr`` multiplies (flat). A fixed divisor instead of the number of
    shots gives ``c = lr * shots / divisor``; a fixed step size gives any other ``c``.
    """
    norm = float((step * step).sum())
    if norm == 0.0:
        return None
    c = float(((theta - got) * step).sum()) / norm
    if abs(c - lr) <= 1e-6 * abs(lr) or not _close(got, theta - c * step):
        return None
    for divisor in range(2, 101):
        if divisor != shots and abs(c - lr * shots / divisor) <= 1e-6 * abs(c):
            return (f"you divided the summed squared error by {divisor}, but this task has {shots} shots: use "
                    "F.mse_loss (the mean over the shots) or divide by x.shape[0]; never by a fixed number.")
    return (f"your step is {c:.4g} times the gradient, but {name} is {lr:g} here: use the {name} argument, not "
            "a fixed number (the checker tries more than one value).")


def _probe_dict(params: Params, out: Params, w: Params) -> Tensor:
    return sum((out[k] * w[k]).sum() for k in params)


@_checker
def check_inner_step(fn: Callable) -> None:
    r"""Check ``fn(f, params, x, y, inner_lr, create_graph)`` = :math:`\theta - \alpha\nabla_\theta \mathrm{MSE}`.

    ``x, y [shots, 1]`` (one task). The result must be a new dict with the same keys and shapes;
    ``params`` must not be modified. With ``create_graph=True`` the step is differentiable
    (d theta'/d theta = I - alpha H); with ``False`` the gradient is a constant (d theta'/d theta = I).
    Two tasks with different step sizes and shot counts (0.1 and 5 shots, 0.037 and 3 shots), so that
    neither may be hard-coded. Reference: :func:`metatut.inner_step`.
    """
    check = "check_inner_step"
    cases = ((0, 5, 0.1), (1, 3, 0.037))   # seed, shots, inner_lr
    for seed, shots, lr in cases:
        fx = _fixture(seed, 1, shots, shots)
        f, params = fx.f, fx.params
        x, y = fx.batch.support_x[0], fx.batch.support_y[0]
        w = _projection(params, seed=seed + 1)
        for create_graph in (True, False):
            where = f"inner_lr={lr:g}, {shots} shots, create_graph={create_graph}"
            before_params, before_xy = _snapshot(params), _snapshot({"x": x, "y": y})
            out = _call(check, fn, f, params, x, y, lr, create_graph)
            _expect_unchanged(check, "params", params, before_params)
            if out is params:
                raise _fail(check, "you returned the params dict itself.",
                            "Hint: return a NEW dict {name: p - inner_lr * g}; leave params untouched.")
            _expect_unchanged(check, "the data", {"x": x, "y": y}, before_xy)
            out = _expect_param_dict(check, out, params, "{k: p - inner_lr * g for (k, p), g in zip(params.items(), grads)}",
                                     name="theta'", shape_hint="theta'[k] = params[k] - inner_lr * (the gradient for "
                                     "params[k]): one gradient per parameter, each shaped like its parameter.")

            reference = functional.inner_step(fx.model, params, x, y, lr, create_graph=create_graph)
            got, expected = _flat(out.values()), _flat(reference.values())
            if not _close(got, expected):
                g = _mse_grad(f, params, x, y)
                g_sum = _mse_grad(f, params, x, y, reduction="sum")
                theta = {k: p.detach() for k, p in params.items()}
                candidates = [
                    (_step(theta, g, -lr), "wrong sign: step down the gradient, theta' = theta - inner_lr * grad."),
                    (_step(theta, g, 1.0), "you forgot to multiply the gradient by inner_lr."),
                    (_step(theta, g_sum, lr), f"your step is {shots}x too large: the loss is the MEAN squared "
                                              "error over the shots (F.mse_loss), not the sum."),
                    (theta, "theta' equals theta: apply the step, theta' = theta - inner_lr * grad."),
                    ({k: lr * v for k, v in zip(params, g, strict=True)},
                     "you returned the step inner_lr * grad; return theta - inner_lr * grad."),
                    ({k: -lr * v for k, v in zip(params, g, strict=True)},
                     "you returned -inner_lr * grad; add theta: theta' = theta - inner_lr * grad."),
                    (dict(zip(params, g, strict=True)), "you returned the gradient; return theta - inner_lr * grad."),
                ]
                hint = (_first_match(got, [(_flat(c.values()), h) for c, h in candidates])
                        or _fitted_step_hint(got, _flat(theta.values()), _flat(g), lr, shots)
                        or "theta' = theta - inner_lr * (gradient of F.mse_loss(f(params, x), y)).")
                raise _mismatch(check, got, expected, f"theta' is wrong ({where}).", f"Hint: {hint}")

            # The probe s = sum_k <w_k, theta'_k> has gradient w - lr * H w (second order) or w (first order).
            probe = _probe_dict(params, out, w)
            expected = _flat(torch.autograd.grad(_probe_dict(params, reference, w), list(params.values())))
            first_order = _flat(w.values())
            if not isinstance(probe, Tensor) or not probe.requires_grad:
                if create_graph:
                    raise _fail(check, "theta' is not connected to params: no gradient can flow through the step.",
                                "Hint: don't detach or use torch.no_grad(); compute theta - inner_lr * grad from "
                                "the params tensors themselves.")
                raise _fail(check, "with create_graph=False theta' must still depend on theta through its first "
                                   "term (first-order MAML needs that path): only the gradient is a constant.",
                            "Hint: return {k: p - inner_lr * g} without detaching p or the result.")
            got = _flat(_gradients(check, probe, params, "theta'"))
            if not _close(got, expected):
                if create_graph and _close(got, first_order):
                    hint = ("the inner gradient is treated as a constant: did you pass create_graph=True to "
                            "torch.autograd.grad (create_graph=create_graph)?")
                elif not create_graph and _close(got, _second_order_probe(fx, params, x, y, lr, w)):
                    hint = ("with create_graph=False the inner gradient must be a constant (first-order MAML), "
                            "but yours is differentiated through. Pass create_graph=create_graph to "
                            "torch.autograd.grad instead of always True.")
                elif _close(got, expected - first_order):
                    hint = ("the path through the first term theta is missing: don't detach theta, use "
                            "p - inner_lr * g with p taken from params.")
                else:
                    hint = ("theta' = theta - inner_lr * grad must be built from params and the gradient of "
                            "F.mse_loss(f(params, x), y) with torch.autograd.grad(..., create_graph=create_graph).")
                raise _mismatch(check, got, expected, f"the value matches but the gradient through theta' does "
                                                      f"not ({where}).", f"Hint: {hint}")
    print(f"✔ {check} passed: theta' matches the reference (inner_lr 0.1 and 0.037, 5 and 3 shots); "
          "differentiable (second order) with create_graph=True, first order with False; params untouched.")


def _second_order_probe(fx: _Fixture, params: Params, x: Tensor, y: Tensor, lr: float, w: Params) -> Tensor:
    adapted = functional.inner_step(fx.model, params, x, y, lr, create_graph=True)
    probe = sum((adapted[k] * w[k]).sum() for k in params)
    return _flat(torch.autograd.grad(probe, list(params.values())))


# ------------------------------------------------------------------------------------- 3. MAML loss
def _maml_variant(f, params: Params, batch: TaskBatch, lr: float, *, adapt_on: str = "support",
                  score_on: str = "query", sign: float = 1.0, shared: str | None = None) -> Tensor:
    """Value (no graph) of a MAML-loss variant, for recognising mistakes: mean over tasks."""
    data = {"support": (batch.support_x, batch.support_y), "query": (batch.query_x, batch.query_y)}
    ax, ay = data[adapt_on]
    sx, sy = data[score_on]
    if shared is not None:  # one step on all tasks' support sets together
        g = _mse_grad(f, params, ax, ay, reduction="mean")
        if shared == "sum":
            g = [batch.num_tasks * v for v in g]
        adapted = _step({k: p.detach() for k, p in params.items()}, g, sign * lr)
        with torch.no_grad():
            return torch.stack([F.mse_loss(f(adapted, sx[t]), sy[t]) for t in range(batch.num_tasks)]).mean()
    losses = []
    for t in range(batch.num_tasks):
        adapted = _step({k: p.detach() for k, p in params.items()}, _mse_grad(f, params, ax[t], ay[t]), sign * lr)
        with torch.no_grad():
            losses.append(F.mse_loss(f(adapted, sx[t]), sy[t]))
    return torch.stack(losses).mean()


@_checker
def check_maml_loss(fn: Callable) -> None:
    r"""Check ``fn(f, params, batch, inner_lr)`` = :math:`\frac1T\sum_t L_{Q_t}(\theta-\alpha\nabla L_{S_t}(\theta))`.

    One inner SGD step per task on its support set (second order: the inner gradient stays in the
    graph), then the mean over tasks of the query MSE at the adapted parameters. The result must be a
    0-dim tensor whose gradient w.r.t. ``params`` is the second-order meta-gradient.
    Two task batches with different sizes and step sizes (0.1 and 0.037), so that neither may be hard-coded.
    Reference: :func:`metatut.maml_loss` (``inner_steps=1``, ``reduction='mean'``).
    """
    check = "check_maml_loss"
    shapes = ((0, 3, 5, 7, 0.1), (1, 2, 4, 6, 0.037))
    for seed, tasks, shots, query_shots, lr in shapes:
        fx = _fixture(seed, tasks, shots, query_shots)
        f, params, batch = fx.f, fx.params, fx.batch
        before_params, before_batch = _snapshot(params), _snapshot(_batch_tensors(batch))
        out = _call(check, fn, f, params, batch, lr)
        _expect_unchanged(check, "params", params, before_params)
        _expect_unchanged(check, "the batch", _batch_tensors(batch), before_batch)
        _expect_scalar_tensor(check, out, (tasks,), tuple(batch.query_x.shape))

        reference = functional.maml_loss(fx.model, params, batch, inner_lr=lr, vectorize=False)
        if not _close(out, reference):
            no_adaptation = functional.summed_task_loss(fx.model, params, batch, use="query", reduction="mean",
                                                        vectorize=False).detach()
            candidates = [
                (no_adaptation, "your loss equals the query loss at theta without adaptation: first take one "
                                "inner step on each task's support set, then score the adapted params."),
                (_maml_variant(f, params, batch, lr, adapt_on="query", score_on="support"),
                 "looks like support and query are swapped: adapt on support_x/support_y, score on "
                 "query_x/query_y."),
                (_maml_variant(f, params, batch, lr, adapt_on="support", score_on="support"),
                 "you scored the adapted params on the support set: evaluate them on the query set."),
                (_maml_variant(f, params, batch, lr, adapt_on="query", score_on="query"),
                 "you adapted on the query set: the inner step uses the support set, the query set scores it."),
                (tasks * reference.detach(), f"your loss is {tasks}x too large: average over tasks "
                                             "(mean), not sum."),
                (_maml_variant(f, params, batch, lr, sign=-1.0),
                 "wrong sign in the inner step: theta' = theta - inner_lr * grad."),
                (_maml_variant(f, params, batch, 1.0),
                 "you forgot to multiply the inner gradient by inner_lr."),
                *([(_maml_variant(f, params, batch, 0.1),
                    f"you used a fixed inner step size 0.1, but inner_lr is {lr:g} here: use the inner_lr "
                    "argument (the checker tries more than one value).")] if lr != 0.1 else []),
                (_maml_variant(f, params, batch, lr, shared="mean"),
                 "you took one shared inner step on all tasks together: adapt each task separately, "
                 "on its own support set (loop over tasks)."),
                (_maml_variant(f, params, batch, lr, shared="sum"),
                 "you took one shared inner step on all tasks together: adapt each task separately, "
                 "on its own support set (loop over tasks)."),
            ]
            hint = _first_match(out, candidates) or (
                "for each task t: theta_t = theta - inner_lr * grad of MSE on (support_x[t], support_y[t]); "
                "loss_t = MSE of f(theta_t, query_x[t]) vs query_y[t]; return the mean of the loss_t.")
            raise _mismatch(check, out, reference, f"the value is wrong (inner_lr={lr:g}, {tasks} tasks; expected "
                                                   f"{reference.item():.6f}, got {out.item():.6f}).", f"Hint: {hint}")

        got = _flat(_gradients(check, out, params, "your loss"))
        expected = _flat(torch.autograd.grad(reference, list(params.values())))
        if not _close(got, expected):
            first_order = functional.maml_loss(fx.model, params, batch, inner_lr=lr, first_order=True,
                                               vectorize=False)
            if _close(got, _flat(torch.autograd.grad(first_order, list(params.values())))):
                hint = ("yours is the first-order meta-gradient (the Hessian term is missing): pass "
                        "create_graph=True to the inner torch.autograd.grad and don't detach the inner gradient.")
            else:
                hint = ("build theta' from params with differentiable operations and "
                        "torch.autograd.grad(..., create_graph=True); detach nothing.")
            raise _mismatch(check, got, expected, "the value matches but the meta-gradient does not.",
                            f"Hint: {hint}")
    print(f"✔ {check} passed: value and second-order meta-gradient match metatut.maml_loss "
          f"on {len(shapes)} task batches (inner_lr 0.1 and 0.037).")


# The checkers of later notebooks live in their own modules (which import the fixtures above); they are
# re-exported here lazily, so that ``metatut.checks.check_...`` reaches every checker without an import cycle.
_LATER_CHECKERS = {
    "check_reptile_update": "checks_family",
    "check_meta_sgd_inner_step": "checks_family",
    "check_episode_sampler": "checks_fewshot",
    "check_protonet_logits": "checks_fewshot",
}
__all__ += list(_LATER_CHECKERS)


def __getattr__(name: str):
    if name in _LATER_CHECKERS:
        import importlib
        return getattr(importlib.import_module(f".{_LATER_CHECKERS[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
