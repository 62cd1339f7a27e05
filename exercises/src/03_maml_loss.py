# %% [markdown]
# # Exercise 3 · The MAML loss

# %% [markdown] tags=["student-only"]
# *Goes with course notebook [03_maml_sinusoid](../notebooks/03_maml_sinusoid.ipynb).*
#
# **How to.** Write the function in the cell marked `# YOUR CODE HERE`, run that cell, then run the
# check cell below it: it names what is wrong, with a hint, or prints one line starting with ✔.
# The worked solution is in [`solutions/03_maml_loss.ipynb`](solutions/03_maml_loss.ipynb); try first.

# %% [markdown] tags=["solution-only"]
# *Goes with course notebook [03_maml_sinusoid](../../notebooks/03_maml_sinusoid.ipynb).*
#
# **Solution copy**, generated from `exercises/src/03_maml_loss.py`. The exercise itself is
# [`../03_maml_loss.ipynb`](../03_maml_loss.ipynb).

# %% [markdown]
# A meta-batch holds $T$ tasks, each with a support set $S_t$ (to adapt on) and a query set $Q_t$ (to
# score the adapted model on). MAML (Finn et al., 2017) adapts to each task with one inner step and
# minimises the query loss after adaptation:
#
# $$
# \mathcal{L}(\theta) = \frac{1}{T} \sum_{t=1}^{T} L_{Q_t}\big(\theta'_t\big), \qquad
# \theta'_t = \theta - \alpha \, \nabla_\theta L_{S_t}(\theta),
# $$
#
# where $L_S$ and $L_Q$ are mean squared errors over the set's examples. Its gradient
#
# $$
# \nabla_\theta \mathcal{L} = \frac{1}{T} \sum_{t=1}^{T}
# \big(I - \alpha \nabla^2_\theta L_{S_t}(\theta)\big) \, \nabla L_{Q_t}(\theta'_t)
# $$
#
# contains a Hessian term, so the inner gradient must stay in the autograd graph
# (`create_graph=True`, exercise 2).

# %%
import torch
import torch.nn.functional as F  # noqa: F401 (your answer may use F.mse_loss)

import metatut as mt
from metatut.checks import check_maml_loss

# %% [markdown]
# ## Your turn
#
# `batch` is a `metatut.TaskBatch` with fields `support_x, support_y, query_x, query_y`, each of
# shape `[tasks, shots, 1]`, and `batch.num_tasks`. Loop over the tasks: one inner step on
# `support_x[t], support_y[t]` (second order), then the query MSE at the adapted parameters; return
# the mean over tasks as a 0-dim tensor. Your `inner_step` from exercise 2 fits here: paste it in and
# call it, or write the step inline.

# %%
def maml_loss(f, params, batch, inner_lr):
    """Second-order MAML meta-loss with one inner step: mean over tasks of the query MSE after adaptation.

    f: the model as a pure function f(params, x); params: dict name -> tensor;
    batch: TaskBatch with support_x, support_y, query_x, query_y of shape [tasks, shots, 1];
    inner_lr: float. Returns a 0-dim tensor whose gradient w.r.t. params is the meta-gradient.
    """
    ### BEGIN SOLUTION
    query_losses = []
    for t in range(batch.num_tasks):
        support_loss = F.mse_loss(f(params, batch.support_x[t]), batch.support_y[t])
        grads = torch.autograd.grad(support_loss, list(params.values()), create_graph=True)
        adapted = {name: p - inner_lr * g for (name, p), g in zip(params.items(), grads, strict=True)}
        query_losses.append(F.mse_loss(f(adapted, batch.query_x[t]), batch.query_y[t]))
    return torch.stack(query_losses).mean()
    ### END SOLUTION

# %% [markdown]
# ## Check

# %% tags=["check"]
check_maml_loss(maml_loss)

# %% [markdown]
# ## Try it: a short meta-training run
#
# Your loss drives Adam on the meta-parameters, as in the MAML paper's sinusoid experiment (inner
# step 0.01, meta-batches of 25 tasks with 10 shots each). The package's `mt.maml_loss` computes the
# same value (and runs all tasks at once with `torch.func.vmap`). The budget profile (`mt.pick`)
# sets the size of the run: a token run in CI, a few hundred meta-iterations on a laptop.

# %% tags=["demo"]
model = mt.mlp(seed=0)
f = mt.functional_model(model)
params = mt.init_params(model)
tasks = mt.SinusoidTasks()
generator = torch.Generator().manual_seed(0)
meta_batch = mt.pick(ci=5, laptop=25)
iterations = mt.pick(ci=3, laptop=300)

batch = tasks.sample(meta_batch, 10, generator=generator)
print(f"yours: {maml_loss(f, params, batch, 0.01).item():.4f}   "
      f"metatut: {mt.maml_loss(model, params, batch, inner_lr=0.01).item():.4f}")

optimizer = torch.optim.Adam(params.values(), lr=1e-3)
window = []  # meta-losses since the last print (one batch is noisy: print their mean)
for step in range(1, iterations + 1):
    batch = tasks.sample(meta_batch, 10, generator=generator)
    loss = maml_loss(f, params, batch, inner_lr=0.01)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    window.append(loss.item())
    if step % 50 == 0 or step == iterations:
        first = step - len(window) + 1
        print(f"meta-iterations {first:3d}-{step:3d}: mean meta-loss {sum(window) / len(window):.3f}")
        window = []
