# %% [markdown]
# # Exercise 2 · One inner step

# %% [markdown] tags=["student-only"]
# *Goes with course notebook [02_inner_loop](../notebooks/02_inner_loop.ipynb).*
#
# **How to.** Write the function in the cell marked `# YOUR CODE HERE`, run that cell, then run the
# check cell below it: it names what is wrong, with a hint, or prints one line starting with ✔.
# The worked solution is in [`solutions/02_inner_step.ipynb`](solutions/02_inner_step.ipynb); try first.

# %% [markdown] tags=["solution-only"]
# *Goes with course notebook [02_inner_loop](../../notebooks/02_inner_loop.ipynb).*
#
# **Solution copy**, generated from `exercises/src/02_inner_step.py`. The exercise itself is
# [`../02_inner_step.ipynb`](../02_inner_step.ipynb).

# %% [markdown]
# MAML adapts the meta-parameters $\theta$ to a task with one step of gradient descent on the task's
# support set $S = \{(x_k, y_k)\}_{k=1}^{K}$:
#
# $$
# \theta' = \theta - \alpha \, \nabla_\theta L_S(\theta), \qquad
# L_S(\theta) = \frac{1}{K} \sum_{k=1}^{K} \big(f_\theta(x_k) - y_k\big)^2 .
# $$
#
# Later (exercise 3) we differentiate a loss at $\theta'$ with respect to $\theta$. By the chain rule
# that needs
#
# $$
# \frac{\partial \theta'}{\partial \theta} = I - \alpha \, \nabla^2_\theta L_S(\theta),
# $$
#
# so the gradient $\nabla_\theta L_S$ must itself be part of the autograd graph:
# `torch.autograd.grad(loss, tensors, create_graph=True)` records how it was computed
# (**second-order** MAML). With `create_graph=False` the gradient is a constant and
# $\partial \theta' / \partial \theta = I$ (**first-order** MAML): $\theta'$ still depends on $\theta$
# through its first term.
#
# Parameters are a dict `{name: tensor}`; `f(params, x)` evaluates the model at any such dict.

# %%
import torch
import torch.nn.functional as F

import metatut as mt
from metatut.checks import check_inner_step

# %% [markdown]
# ## Your turn
#
# One task: `x` and `y` have shape `[shots, 1]`. Return a **new** dict with the same keys, holding
# $\theta - \alpha \nabla_\theta L_S(\theta)$. Do not modify `params` (no `-=`, no `params[k] = ...`).
# `F.mse_loss` gives $L_S$; `torch.autograd.grad(loss, list(params.values()), create_graph=...)`
# returns the gradients in the order of `params`.

# %%
def inner_step(f, params, x, y, inner_lr, create_graph):
    """One SGD step on one task's support set: theta' = theta - inner_lr * grad MSE(f(theta, x), y).

    f: the model as a pure function f(params, x); params: dict name -> tensor;
    x, y: [shots, 1]; inner_lr: float. Returns a new dict with the same keys and shapes,
    differentiable through the gradient when create_graph is True.
    """
    ### BEGIN SOLUTION
    loss = F.mse_loss(f(params, x), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    return {name: p - inner_lr * g for (name, p), g in zip(params.items(), grads, strict=True)}
    ### END SOLUTION

# %% [markdown]
# ## Check

# %% tags=["check"]
check_inner_step(inner_step)

# %% [markdown]
# ## Try it
#
# One step on a sinusoid task lowers its support loss. The gradient of the query loss with respect
# to $\theta$ differs between the two settings of `create_graph` by the Hessian term: that difference
# is what second-order MAML keeps and first-order MAML drops.

# %% tags=["demo"]
model = mt.mlp(seed=0)
f = mt.functional_model(model)
params = mt.init_params(model)
task = mt.SinusoidTasks().sample(1, 10, generator=torch.Generator().manual_seed(0))
x, y, qx, qy = task.support_x[0], task.support_y[0], task.query_x[0], task.query_y[0]

adapted = inner_step(f, params, x, y, inner_lr=0.01, create_graph=True)
print(f"support loss: {F.mse_loss(f(params, x), y).item():.4f} -> {F.mse_loss(f(adapted, x), y).item():.4f}")

meta_grads = {}
for create_graph in (True, False):
    adapted = inner_step(f, params, x, y, inner_lr=0.01, create_graph=create_graph)
    query_loss = F.mse_loss(f(adapted, qx), qy)
    meta_grads[create_graph] = torch.autograd.grad(query_loss, list(params.values()))
difference = sum((a - b).norm() ** 2 for a, b in zip(meta_grads[True], meta_grads[False], strict=True)) ** 0.5
print(f"|second-order - first-order meta-gradient| = {difference.item():.2e}")
