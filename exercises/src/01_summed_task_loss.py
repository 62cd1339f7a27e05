# %% [markdown]
# # Exercise 1 · The summed task loss

# %% [markdown] tags=["student-only"]
# *Goes with course notebook [01_summed_task_loss](../notebooks/01_summed_task_loss.ipynb).*
#
# **How to.** Write the function in the cell marked `# YOUR CODE HERE`, run that cell, then run the
# check cell below it: it names what is wrong, with a hint, or prints one line starting with ✔.
# The worked solution is in
# [`solutions/01_summed_task_loss.ipynb`](solutions/01_summed_task_loss.ipynb); try first.

# %% [markdown] tags=["solution-only"]
# *Goes with course notebook [01_summed_task_loss](../../notebooks/01_summed_task_loss.ipynb).*
#
# **Solution copy**, generated from `exercises/src/01_summed_task_loss.py`. The exercise itself is
# [`../01_summed_task_loss.ipynb`](../01_summed_task_loss.ipynb).

# %% [markdown]
# The simplest way to learn from many tasks is to train one model on all of them at once, with no
# adaptation. For tasks $t = 1, \dots, T$, each with $K$ examples $(x_{t,k}, y_{t,k})$, the
# **summed task loss** is
#
# $$
# L(\theta) = \sum_{t=1}^{T} L_t(\theta), \qquad
# L_t(\theta) = \frac{1}{K} \sum_{k=1}^{K} \big(f_\theta(x_{t,k}) - y_{t,k}\big)^2 .
# $$
#
# Each task's loss is a mean squared error (a mean over its shots); the task losses are **summed**.
#
# The model is a pure function `f(params, x)`: `params` is a dict `{name: tensor}` and
# `f = metatut.functional_model(model)`. `f` works on any leading dimensions: for `x` of shape
# `[tasks, shots, 1]`, `f(params, x)` has shape `[tasks, shots, 1]`.

# %%
import torch
import torch.nn.functional as F  # noqa: F401 (your answer may use F.mse_loss)

import metatut as mt
from metatut.checks import check_summed_task_loss

# %% [markdown]
# ## Your turn
#
# `x` and `y` have shape `[tasks, shots, 1]`. Return a 0-dim tensor that stays differentiable with
# respect to `params` (no `.item()`, no `.detach()`). Two or three lines are enough; `Tensor.mean`
# and `Tensor.sum` take a `dim=` argument (a tuple of dimensions works too).

# %%
def summed_task_loss(f, params, x, y):
    """Sum over tasks of each task's mean squared error.

    f: the model as a pure function f(params, x); params: dict name -> tensor;
    x, y: [tasks, shots, 1]. Returns a 0-dim tensor, differentiable w.r.t. params.
    """
    ### BEGIN SOLUTION
    squared_error = (f(params, x) - y) ** 2       # [tasks, shots, 1]
    per_task = squared_error.mean(dim=(1, 2))     # [tasks]: each task's MSE
    return per_task.sum()
    ### END SOLUTION

# %% [markdown]
# ## Check

# %% tags=["check"]
check_summed_task_loss(summed_task_loss)

# %% [markdown]
# ## Try it
#
# The package computes the same objective as `mt.summed_task_loss(model, params, batch, use="support")`
# (its default `use="both"` also adds each task's query examples). Below: your loss on 25 sinusoid
# tasks, the package's, and the gradient that joint training would follow.

# %% tags=["demo"]
model = mt.mlp(seed=0)
f = mt.functional_model(model)
params = mt.init_params(model)
batch = mt.SinusoidTasks().sample(25, 10, generator=torch.Generator().manual_seed(0))

loss = summed_task_loss(f, params, batch.support_x, batch.support_y)
package = mt.summed_task_loss(model, params, batch, use="support")
grads = torch.autograd.grad(loss, list(params.values()))
print(f"yours: {loss.item():.4f}   metatut: {package.item():.4f}")
print("gradient norm per tensor:", {k: round(g.norm().item(), 3) for k, g in zip(params, grads, strict=True)})
