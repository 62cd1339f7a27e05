"""Losses as functions of (params, task) (issue "metatut as a library researchers adopt", section 2): the closure form
of maml_loss / adapt / adaptation_curve against hand-written references in float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import metatut as mt

F64 = torch.float64


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


# ------------------------------------------------------------------------------- (a) a model with two inputs
class TwoInputs(nn.Module):
    """forward(x, z): what a single-tensor loss_fn(model(x), y) cannot call."""

    def __init__(self):
        super().__init__()
        self.fx, self.fz, self.out = nn.Linear(2, 8), nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x, z):
        return self.out(torch.tanh(self.fx(x) * torch.sigmoid(self.fz(z))))


def two_input_tasks(tasks=4, shots=6, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)
    return {"sx": r(tasks, shots, 2), "sz": r(tasks, shots, 3), "sy": r(tasks, shots, 1),
            "qx": r(tasks, shots, 2), "qz": r(tasks, shots, 3), "qy": r(tasks, shots, 1)}


def two_input_losses(model):
    def inner(params, task):
        return F.mse_loss(functional_call(model, params, (task["sx"], task["sz"])), task["sy"])

    def outer(params, task):
        return F.mse_loss(functional_call(model, params, (task["qx"], task["qz"])), task["qy"])
    return inner, outer


def reference_meta_gradient(model, params, tasks, alpha, steps, first_order):
    """Per task, by hand: autograd.grad of the support loss, SGD steps, the query loss; mean over tasks."""
    names = list(params)
    total = 0.0
    n = tasks["sx"].shape[0]
    for t in range(n):
        phi = dict(params)
        for _ in range(steps):
            loss = F.mse_loss(functional_call(model, phi, (tasks["sx"][t], tasks["sz"][t])), tasks["sy"][t])
            g = torch.autograd.grad(loss, [phi[k] for k in names], create_graph=not first_order)
            phi = {k: phi[k] - alpha * (gk.detach() if first_order else gk) for k, gk in zip(names, g, strict=True)}
        total = total + F.mse_loss(functional_call(model, phi, (tasks["qx"][t], tasks["qz"][t])), tasks["qy"][t])
    loss = total / n
    return loss, torch.autograd.grad(loss, [params[k] for k in names])


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_two_input_model_meta_gradient_equals_hand_written_reference_vmap_and_loop(first_order, steps):
    torch.manual_seed(0)
    model = TwoInputs().to(F64)
    assert mt.can_vectorize(model)      # Linear layers in a parameter-free container: the policy takes vmap
    params = mt.init_params(model)
    tasks = two_input_tasks()
    inner, outer = two_input_losses(model)
    ref_loss, ref_grad = reference_meta_gradient(model, params, tasks, 0.1, steps, first_order)
    results = {}
    for vectorize in (True, False):
        loss = mt.maml_loss(model, params, tasks, inner_loss=inner, outer_loss=outer, inner_lr=0.1,
                            inner_steps=steps, first_order=first_order, vectorize=vectorize)
        results[vectorize] = flat(torch.autograd.grad(loss, list(params.values())))
        torch.testing.assert_close(loss, ref_loss, rtol=1e-13, atol=0)
        assert rel(results[vectorize], flat(ref_grad)) < 1e-12
    assert rel(results[True], results[False]) < 1e-12


def test_closures_over_a_task_batch_equal_the_loss_fn_form():
    """A TaskBatch reaches the closures as a Task named tuple; the loss_fn form is the same computation."""
    model = mt.mlp(hidden=(8, 8), seed=1).to(F64)
    params = mt.init_params(model)
    batch = mt.SinusoidTasks().sample(5, 6, 7, generator=mt.make_generator(3), dtype=F64)
    seen = []

    def inner(p, task):
        seen.append(type(task).__name__)
        return F.mse_loss(functional_call(model, p, (task.support_x,)), task.support_y)

    def outer(p, task):
        return F.mse_loss(functional_call(model, p, (task.query_x,)), task.query_y)

    for vectorize in (True, False):
        a = mt.maml_loss(model, params, batch, inner_loss=inner, outer_loss=outer, inner_lr=0.05, inner_steps=2,
                         vectorize=vectorize)
        b = mt.maml_loss(model, params, batch, inner_lr=0.05, inner_steps=2, vectorize=vectorize)
        assert rel(flat(torch.autograd.grad(a, list(params.values()))),
                   flat(torch.autograd.grad(b, list(params.values())))) < 1e-13
    assert set(seen) == {"Task"}
    curve = mt.adaptation_curve(model, params, batch, inner_loss=inner, outer_loss=outer, inner_lr=0.05, steps=3)
    torch.testing.assert_close(curve, mt.adaptation_curve(model, params, batch, inner_lr=0.05, steps=3),
                               rtol=1e-12, atol=0)
    summary = mt.evaluate_adaptation(model, params, batch, inner_loss=inner, outer_loss=outer, inner_lr=0.05,
                                     steps=(0, 3))
    assert summary[3].mean == pytest.approx(float(curve[:, 3].mean()), rel=1e-12)


# ------------------------------------------------------------------------------ (b) a dict of token ids
class BagOfEmbeddings(nn.Module):
    """Embedding + mean over each sentence's first `length` tokens + a linear head (the NLP notebook's shape)."""

    def __init__(self, vocab=30, dim=6, classes=3):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, classes)

    def forward(self, ids, lengths):
        mask = (torch.arange(ids.shape[-1], device=ids.device) < lengths[..., None]).to(self.emb.weight.dtype)
        pooled = (self.emb(ids) * mask[..., None]).sum(-2) / mask.sum(-1, keepdim=True)
        return self.head(pooled)


def token_tasks(tasks=4, shots=5, length=7, vocab=30, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for part in ("support", "query"):
        out[f"{part}_ids"] = torch.randint(0, vocab, (tasks, shots, length), generator=g)             # int64
        out[f"{part}_lengths"] = torch.randint(1, length + 1, (tasks, shots), generator=g)
        out[f"{part}_labels"] = torch.randint(0, classes, (tasks, shots), generator=g)
    return out


def token_losses(model):
    def inner(params, task):
        logits = functional_call(model, params, (task["support_ids"], task["support_lengths"]))
        return F.cross_entropy(logits, task["support_labels"])

    def outer(params, task):
        logits = functional_call(model, params, (task["query_ids"], task["query_lengths"]))
        return F.cross_entropy(logits, task["query_labels"])
    return inner, outer


@pytest.mark.parametrize("first_order", [False, True])
def test_dict_of_token_ids_and_lengths_runs_vmap_and_loop_and_matches_the_reference(first_order):
    torch.manual_seed(0)
    model = BagOfEmbeddings().to(F64)
    params = mt.init_params(model)
    tasks = token_tasks()
    assert tasks["support_ids"].dtype == torch.int64 and tasks["support_ids"].shape == (4, 5, 7)
    inner, outer = token_losses(model)
    grads = {}
    for vectorize in ("auto", False, True):
        loss = mt.maml_loss(model, params, tasks, inner_loss=inner, outer_loss=outer, inner_lr=0.5, inner_steps=2,
                            first_order=first_order, vectorize=vectorize)
        grads[vectorize] = flat(torch.autograd.grad(loss, list(params.values())))
    # nn.Embedding is not statically verified: the first 'auto' call checked vmap against the loop through the
    # closures (on the model itself) and cached the verdict
    assert mt.can_vectorize(model)
    # the reference: per task, by hand
    names = list(params)
    total = 0.0
    for t in range(4):
        task = {k: v[t] for k, v in tasks.items()}
        phi = dict(params)
        for _ in range(2):
            g = torch.autograd.grad(inner(phi, task), [phi[k] for k in names], create_graph=not first_order)
            phi = {k: phi[k] - 0.5 * (gk.detach() if first_order else gk) for k, gk in zip(names, g, strict=True)}
        total = total + outer(phi, task)
    ref = flat(torch.autograd.grad(total / 4, list(params.values())))
    for g in grads.values():
        assert rel(g, ref) < 1e-12
    adapted = mt.adapt(model, params, tasks, inner_loss=inner, inner_lr=0.5, steps=2)
    assert adapted["emb.weight"].shape == (4, 30, 6)


def test_runtime_check_through_closures_leaves_the_model_untouched_and_refuses_a_buffer_update():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 1)
            self.register_buffer("calls", torch.zeros((), dtype=F64))

        def forward(self, x, scale):
            self.calls += 1
            return self.lin(x) * scale

    model = Counting().to(F64)
    params = mt.init_params(model)
    g = torch.Generator().manual_seed(0)
    tasks = {"x": torch.randn(3, 4, 1, generator=g, dtype=F64), "s": torch.rand(3, 4, 1, generator=g, dtype=F64),
             "y": torch.randn(3, 4, 1, generator=g, dtype=F64)}

    def loss(p, task):
        return F.mse_loss(functional_call(model, p, (task["x"], task["s"])), task["y"])

    with pytest.warns(mt.VectorizeWarning, match="Counting"):
        auto = mt.maml_loss(model, params, tasks, inner_loss=loss, outer_loss=loss, inner_lr=0.1)
    calls = model.calls.item()
    assert calls == 3 * 2            # the check restored the buffer; the loop ran 3 tasks x (inner + outer)
    loop = mt.maml_loss(model, params, tasks, inner_loss=loss, outer_loss=loss, inner_lr=0.1, vectorize=False)
    torch.testing.assert_close(auto, loop, rtol=0, atol=0)
    with pytest.raises(mt.VectorizeError, match="Counting"):
        mt.maml_loss(model, params, tasks, inner_loss=loss, outer_loss=loss, inner_lr=0.1, vectorize=True)


# -------------------------------------------------------------- (c) iMAML's proximal term, a function of θ
def linear_regression(tasks=3, shots=8, query=6, dim=3, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(dim, 1).to(F64)
    params = mt.init_params(model)
    batch = mt.LinearTasks(dim=dim, noise_std=0.1).sample(tasks, shots, query, generator=mt.make_generator(seed),
                                                          dtype=F64)
    return model, params, batch


def proximal_losses(model, lam):
    """Inner: (1/2n)‖Xφ − y‖² + (λ/2)‖φ − θ‖² (θ: meta_params, the third argument); outer: the query MSE."""
    def inner(params, task, meta_params):
        fit = 0.5 * F.mse_loss(functional_call(model, params, (task.support_x,)), task.support_y)
        prox = sum(((params[k] - meta_params[k]) ** 2).sum() for k in meta_params)
        return fit + 0.5 * lam * prox

    def outer(params, task):
        return F.mse_loss(functional_call(model, params, (task.query_x,)), task.query_y)
    return inner, outer


def augmented(x):
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=F64)], -1)


def theta_vector(params):
    return torch.cat([params["weight"].detach().reshape(-1), params["bias"].detach()]).view(-1, 1)


def test_proximal_inner_loss_converges_to_its_closed_form():
    """With L_S(φ) = (1/2n)‖Xφ − y‖², grad = (XᵀX/n)φ − Xᵀy/n + λ(φ − θ) = 0 gives
    φ* = (XᵀX/n + λI)⁻¹(Xᵀy/n + λθ) (X with a column of ones for the bias)."""
    model, params, batch = linear_regression()
    lam = 0.7
    inner, _ = proximal_losses(model, lam)
    theta = theta_vector(params)
    hessians = [augmented(batch.support_x[t]).T @ augmented(batch.support_x[t]) / batch.shots + lam * torch.eye(4,
                dtype=F64) for t in range(batch.num_tasks)]
    alpha = 1.0 / max(torch.linalg.eigvalsh(h).max().item() for h in hessians)
    for vectorize in (True, False):
        adapted = mt.adapt(model, params, batch, inner_loss=inner, inner_lr=alpha, steps=150, vectorize=vectorize)
        for t in range(batch.num_tasks):
            x, y = augmented(batch.support_x[t]), batch.support_y[t]
            expected = torch.linalg.solve(hessians[t], x.T @ y / batch.shots + lam * theta).view(-1)
            got = torch.cat([adapted["weight"][t].reshape(-1), adapted["bias"][t]])
            torch.testing.assert_close(got.detach(), expected, rtol=0, atol=1e-12)
    # without the proximal term the fixed point is the least-squares fit: θ matters only through λ
    plain = mt.adapt(model, params, batch, inner_loss=lambda p, task, theta: inner(p, task, p), inner_lr=alpha,
                     steps=150)
    assert (plain["weight"] - adapted["weight"]).abs().max() > 1e-3


def proximal_meta_gradient_by_hand(params, batch, alpha, lam, steps):
    """φ_{k+1} = φ_k − α(Hφ_k − b + λ(φ_k − θ)), H = XᵀX/n, b = Xᵀy/n, so dφ_{k+1}/dθ = (I − α(H + λI)) dφ_k/dθ
    + αλI from dφ_0/dθ = I; the meta-gradient is the mean of (dφ_K/dθ)ᵀ ∇L_Q(φ_K), ∇L_Q = (2/m)X_Qᵀ(X_Qφ − y_Q)."""
    theta = theta_vector(params)
    eye = torch.eye(theta.shape[0], dtype=F64)
    total = torch.zeros_like(theta)
    for t in range(batch.num_tasks):
        x, y = augmented(batch.support_x[t]), batch.support_y[t]
        xq, yq = augmented(batch.query_x[t]), batch.query_y[t]
        h, b = x.T @ x / batch.shots, x.T @ y / batch.shots
        phi, jac = theta.clone(), eye.clone()
        for _ in range(steps):
            phi = phi - alpha * (h @ phi - b + lam * (phi - theta))
            jac = (eye - alpha * (h + lam * eye)) @ jac + alpha * lam * eye
        total += jac.T @ (2.0 / batch.query_shots * xq.T @ (xq @ phi - yq))
    return (total / batch.num_tasks).view(-1)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("vectorize", [True, False])
def test_proximal_second_order_meta_gradient_matches_the_hand_derived_formula(steps, vectorize):
    model, params, batch = linear_regression()
    lam, alpha = 0.7, 0.2
    inner, outer = proximal_losses(model, lam)
    loss = mt.maml_loss(model, params, batch, inner_loss=inner, outer_loss=outer, inner_lr=alpha, inner_steps=steps,
                        vectorize=vectorize)
    got = flat(torch.autograd.grad(loss, [params["weight"], params["bias"]]))
    expected = proximal_meta_gradient_by_hand(params, batch, alpha, lam, steps)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    if steps > 1:   # λ changes the meta-gradient after the first step (at φ_0 = θ the proximal gradient is 0)
        assert (expected - proximal_meta_gradient_by_hand(params, batch, alpha, 0.0, steps)).abs().max() > 1e-4


def test_proximal_meta_gradient_matches_central_differences():
    model, params, batch = linear_regression(seed=1)
    inner, outer = proximal_losses(model, 0.7)
    names = list(params)
    theta = torch.cat([params[k].detach().reshape(-1) for k in names])

    def meta_loss(vector):
        p, i = {}, 0
        for k in names:
            p[k] = vector[i:i + params[k].numel()].view_as(params[k])
            i += params[k].numel()
        return mt.maml_loss(model, p, batch, inner_loss=inner, outer_loss=outer, inner_lr=0.2, inner_steps=3)

    v = theta.clone().requires_grad_()
    g = torch.autograd.grad(meta_loss(v), v)[0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        d = torch.randn(theta.shape, generator=gen, dtype=F64)
        d /= d.norm()
        fd = (meta_loss(theta + 1e-6 * d) - meta_loss(theta - 1e-6 * d)).item() / 2e-6
        assert abs(fd - (g @ d).item()) / max(abs(fd), 1e-8) < 1e-6


# --------------------------------------------------------------------------------------- execution options
def test_closures_with_checkpointing_per_task_backward_and_chunks_give_the_same_gradient():
    torch.manual_seed(0)
    model = TwoInputs().to(F64)
    params = mt.init_params(model)
    tasks = two_input_tasks(tasks=5)
    inner, outer = two_input_losses(model)
    options = dict(inner_loss=inner, outer_loss=outer, inner_lr=0.1, inner_steps=2, step_weights=[0.4, 0.6])
    reference = flat(torch.autograd.grad(mt.maml_loss(model, params, tasks, vectorize=False, **options),
                                         list(params.values())))
    for extra in (dict(checkpoint_steps=True, vectorize=False), dict(vmap_chunk_size=2, vectorize=True),
                  dict(per_task_backward=True, vectorize=False), dict(reduction="mean")):
        loss = mt.maml_loss(model, params, tasks, **options, **extra)
        assert rel(flat(torch.autograd.grad(loss, list(params.values()))), reference) < 1e-12, extra
    objective = mt.maml_objective(model, options=mt.MetaOptions(**options))
    _, grads = mt.meta_gradient(objective, params, tasks)
    assert rel(flat(grads.values()), reference) < 1e-12


# ------------------------------------------------------------------------------------------- validation
def test_closure_inputs_are_validated_clearly():
    torch.manual_seed(0)
    model = TwoInputs().to(F64)
    params = mt.init_params(model)
    tasks = two_input_tasks()
    inner, outer = two_input_losses(model)
    with pytest.raises(TypeError, match="both inner_loss and outer_loss"):
        mt.maml_loss(model, params, tasks, inner_loss=inner, inner_lr=0.1)
    with pytest.raises(TypeError, match="both inner_loss and outer_loss"):
        mt.adaptation_curve(model, params, tasks, outer_loss=outer, inner_lr=0.1, steps=1)
    with pytest.raises(TypeError, match="loss_fn is not used with inner_loss/outer_loss"):
        mt.maml_loss(model, params, tasks, inner_loss=inner, outer_loss=outer, inner_lr=0.1, loss_fn=F.l1_loss)
    with pytest.raises(TypeError, match="batch must be a metatut.TaskBatch"):
        mt.maml_loss(model, params, tasks, inner_lr=0.1)          # a dict needs the closures
    with pytest.raises(TypeError, match=r"tasks\['n'\] is a int"):
        mt.maml_loss(model, params, {**tasks, "n": 3}, inner_loss=inner, outer_loss=outer, inner_lr=0.1)
    with pytest.raises(ValueError, match="same leading \\(task\\) dimension"):
        mt.maml_loss(model, params, {**tasks, "qy": tasks["qy"][:2]}, inner_loss=inner, outer_loss=outer,
                     inner_lr=0.1)
    with pytest.raises(ValueError, match="inner_loss must return a scalar tensor"):
        mt.maml_loss(model, params, tasks, inner_loss=lambda p, t: functional_call(model, p, (t["sx"], t["sz"])),
                     outer_loss=outer, inner_lr=0.1, vectorize=False)
    with pytest.raises(TypeError, match=r"outer_loss must take \(params, task\) or \(params, task, meta_params\)"):
        mt.maml_loss(model, params, tasks, inner_loss=inner, outer_loss=lambda p: p, inner_lr=0.1)
    with pytest.raises(TypeError, match="adapt needs support_x and support_y, or tasks and inner_loss"):
        mt.adapt(model, params, tasks, inner_lr=0.1)
    with pytest.raises(TypeError, match="pass the tasks as one pytree"):
        mt.adapt(model, params, tasks, tasks["sy"], inner_loss=inner, inner_lr=0.1)
    with pytest.raises(ValueError, match="task_workers > 1 cannot run inner_loss/outer_loss closures"):
        mt.maml_loss(model, params, tasks, inner_loss=inner, outer_loss=outer, inner_lr=0.1, task_workers=2,
                     vectorize=False)
    with pytest.raises(ValueError, match="params are torch.float64 but tasks\\['sx'\\] is torch.float32"):
        mt.maml_loss(model, params, {**tasks, "sx": tasks["sx"].float()}, inner_loss=inner, outer_loss=outer,
                     inner_lr=0.1)
