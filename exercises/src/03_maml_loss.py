# %% [markdown]
# # Exercise 3 · The MAML loss
#
# *Goes with course notebook 03.* Write the function in the cell marked `# YOUR CODE HERE`, run
# that cell, then run the check cell below it. The worked solution is in
# [`solutions/03_maml_loss.ipynb`](solutions/03_maml_loss.ipynb); try first.
#
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
import torch.nn.functional as F

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
        adapted = {name: p - inner_lr * g for (name, p), g in zip(params.items(), grads)}
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
# step 0.01, 25 tasks of 10 shots per meta-batch). The package's `mt.maml_loss` computes the same
# value (and runs all tasks at once with `torch.func.vmap`). The number of meta-iterations follows the
# budget profile (`mt.pick`): a few in CI, more on a laptop.

# %% tags=["demo"]
model = mt.mlp(seed=0)
f = mt.functional_model(model)
params = mt.init_params(model)
tasks = mt.SinusoidTasks()
generator = torch.Generator().manual_seed(0)
optimizer = torch.optim.Adam(params.values(), lr=1e-3)

batch = tasks.sample(25, 10, generator=generator)
print(f"yours: {maml_loss(f, params, batch, 0.01).item():.4f}   "
      f"metatut: {mt.maml_loss(model, params, batch, inner_lr=0.01).item():.4f}")

iterations = mt.pick(ci=5, laptop=300, gpu=300)
for step in range(1, iterations + 1):
    batch = tasks.sample(25, 10, generator=generator)
    loss = maml_loss(f, params, batch, inner_lr=0.01)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step == 1 or step % 50 == 0 or step == iterations:
        print(f"meta-iteration {step:4d}: meta-loss {loss.item():.3f}")
