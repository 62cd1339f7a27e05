# %% [markdown]
# # Exercise 4b · The Meta-SGD inner step

# %% [markdown] tags=["student-only"]
# *Goes with course notebook [04_maml_family](../notebooks/04_maml_family.ipynb).*
#
# **How to.** Write the function in the cell marked `# YOUR CODE HERE`, run that cell, then run the
# check cell below it: it names what is wrong, with a hint, or prints one line starting with ✔.
# The worked solution is in
# [`solutions/04_meta_sgd_inner_step.ipynb`](solutions/04_meta_sgd_inner_step.ipynb); try first.

# %% [markdown] tags=["solution-only"]
# *Goes with course notebook [04_maml_family](../../notebooks/04_maml_family.ipynb).*
#
# **Solution copy**, generated from `exercises/src/04_meta_sgd_inner_step.py`. The exercise itself is
# [`../04_meta_sgd_inner_step.ipynb`](../04_meta_sgd_inner_step.ipynb).

# %% [markdown]
# MAML adapts with one step of a fixed size $\alpha$. Meta-SGD (Li, Zhou, Chen & Li, 2017) gives **every
# scalar parameter its own step size** and meta-learns those step sizes together with the
# initialisation:
#
# $$
# \theta' = \theta - \boldsymbol\alpha \odot \nabla_\theta L_S(\theta), \qquad
# \min_{\theta,\, \boldsymbol\alpha} \; \frac{1}{T}\sum_{t=1}^{T} L_{Q_t}\big(\theta'_t(\theta, \boldsymbol\alpha)\big),
# $$
#
# where $\odot$ is the elementwise product and $\boldsymbol\alpha$ has the shape of $\theta$. Since
# $\boldsymbol\alpha$ multiplies the gradient elementwise, it sets both the size and (through differing
# values, even signs) the direction of the update. To meta-learn it, $\theta'$ must be differentiable
# with respect to $\boldsymbol\alpha$ ($\partial\theta'/\partial\boldsymbol\alpha = -\nabla L_S(\theta)$,
# elementwise) and, as in second-order MAML, with respect to $\theta$
# ($\partial\theta'/\partial\theta = I - \operatorname{diag}(\boldsymbol\alpha)\,\nabla^2 L_S(\theta)$).

# %%
import torch
import torch.nn.functional as F

import metatut as mt
from metatut.checks_family import check_meta_sgd_inner_step

# %% [markdown]
# ## Your turn
#
# One task: `x` and `y` have shape `[shots, 1]`; `alphas` is a dict with the keys of `params`, and
# `alphas[name]` has the shape of `params[name]`. Return a **new** dict with
# $\theta - \boldsymbol\alpha \odot \nabla_\theta L_S(\theta)$, keeping the inner gradient in the graph
# (`create_graph=True`) and using `alphas` as they are (no `.detach()`, no `.item()`).

# %%
def meta_sgd_inner_step(f, params, alphas, x, y):
    """One Meta-SGD step on one task's support set: theta' = theta - alphas * grad MSE(f(theta, x), y).

    f: the model as a pure function f(params, x); params, alphas: dicts name -> tensor of equal shapes;
    x, y: [shots, 1]. Returns a new dict, differentiable w.r.t. params (second order) and alphas.
    """
    ### BEGIN SOLUTION
    loss = F.mse_loss(f(params, x), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    return {name: p - alphas[name] * g for (name, p), g in zip(params.items(), grads, strict=True)}
    ### END SOLUTION

# %% [markdown]
# ## Check

# %% tags=["check"]
check_meta_sgd_inner_step(meta_sgd_inner_step)

# %% [markdown]
# ## Try it: a short Meta-SGD run
#
# Adam updates $\theta$ and $\boldsymbol\alpha$ together (step sizes start at 0.01 everywhere, as MAML's
# $\alpha$). Your step gives the same $\theta'$ as the package's `mt.inner_step` with a dict of step
# sizes. After meta-training, the step sizes are no longer equal: print how they spread.

# %% tags=["demo"]
model = mt.mlp(seed=0)
f = mt.functional_model(model)
params = mt.init_params(model)
alphas = {k: torch.full_like(v, 0.01).requires_grad_() for k, v in params.items()}
tasks = mt.SinusoidTasks()
generator = torch.Generator().manual_seed(0)
iterations = mt.pick(ci=3, laptop=300)

task = tasks.sample(1, 10, generator=torch.Generator().manual_seed(1))
mine = meta_sgd_inner_step(f, params, alphas, task.support_x[0], task.support_y[0])
reference = mt.inner_step(model, params, task.support_x[0], task.support_y[0], alphas)
print("same theta' as mt.inner_step:", all(torch.allclose(mine[k], reference[k]) for k in params))

optimizer = torch.optim.Adam([*params.values(), *alphas.values()], lr=1e-3)
for step in range(1, iterations + 1):
    batch = tasks.sample(25, 10, 10, generator=generator)
    losses = []
    for t in range(batch.num_tasks):
        adapted = meta_sgd_inner_step(f, params, alphas, batch.support_x[t], batch.support_y[t])
        losses.append(F.mse_loss(f(adapted, batch.query_x[t]), batch.query_y[t]))
    loss = torch.stack(losses).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step == 1 or step % 100 == 0 or step == iterations:
        print(f"meta-iteration {step:4d}: meta-loss {loss.item():.3f}")
spread = torch.cat([a.detach().reshape(-1) for a in alphas.values()])
print(f"learned step sizes: min {spread.min():.4f}, median {spread.median():.4f}, max {spread.max():.4f}")
