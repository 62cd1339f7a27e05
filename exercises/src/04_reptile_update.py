# %% [markdown]
# # Exercise 4a · The Reptile update

# %% [markdown] tags=["student-only"]
# *Goes with course notebook [04_maml_family](../notebooks/04_maml_family.ipynb).*
#
# **How to.** Write the function in the cell marked `# YOUR CODE HERE`, run that cell, then run the
# check cell below it: it names what is wrong, with a hint, or prints one line starting with ✔.
# The worked solution is in [`solutions/04_reptile_update.ipynb`](solutions/04_reptile_update.ipynb); try first.

# %% [markdown] tags=["solution-only"]
# *Goes with course notebook [04_maml_family](../../notebooks/04_maml_family.ipynb).*
#
# **Solution copy**, generated from `exercises/src/04_reptile_update.py`. The exercise itself is
# [`../04_reptile_update.ipynb`](../04_reptile_update.ipynb).

# %% [markdown]
# Reptile (Nichol, Achiam & Schulman, 2018) needs no meta-gradient at all. For each task $t$ of a
# meta-batch it runs a few plain SGD steps from $\theta$ on the task's data and gets adapted parameters
# $\theta'_t$. Then it moves $\theta$ a fraction $\varepsilon$ of the way towards their average:
#
# $$
# \theta \leftarrow \theta + \varepsilon \Big( \bar\theta' - \theta \Big), \qquad
# \bar\theta' = \frac{1}{T} \sum_{t=1}^{T} \theta'_t .
# $$
#
# With $\varepsilon = 1$ this jumps to the average of the adapted parameters; a small $\varepsilon$ is a
# cautious step in the direction that every task's fine-tuning agrees on. No autograd graph is needed:
# the adapted parameters are plain numbers here.

# %%
import torch

import metatut as mt
from metatut.checks_family import check_reptile_update

# %% [markdown]
# ## Your turn
#
# `params` is a dict `{name: tensor}` ($\theta$). `adapted` has the same keys, and each of its tensors
# has an extra leading **task** dimension: `adapted[name]` has shape `[tasks, *params[name].shape]`
# (this is what `mt.adapt` returns). Return a **new** dict with the updated parameters; do not modify
# `params` or `adapted`.

# %%
def reptile_update(params, adapted, epsilon):
    """Reptile's meta-update: theta + epsilon * (mean over tasks of theta'_t - theta), for each parameter.

    params: dict name -> tensor; adapted: dict name -> tensor [tasks, *shape]; epsilon: float.
    Returns a new dict with the keys and shapes of params.
    """
    ### BEGIN SOLUTION
    return {name: p + epsilon * (adapted[name].mean(0) - p) for name, p in params.items()}
    ### END SOLUTION

# %% [markdown]
# ## Check

# %% tags=["check"]
check_reptile_update(reptile_update)

# %% [markdown]
# ## Try it: Reptile on sinusoids
#
# Each meta-iteration: sample 25 tasks, adapt to each with 5 SGD steps of size 0.02 on its 20 points
# (`mt.adapt` with `first_order=True` under `torch.no_grad()`: Reptile differentiates nothing), then
# apply your update with $\varepsilon = 0.5$. The query loss after one test-time step on held-out tasks
# goes down as $\theta$ learns. The budget profile (`mt.pick`) sets the size of the run.

# %% tags=["demo"]
model = mt.mlp(seed=0)
params = {k: v.detach() for k, v in mt.init_params(model).items()}
tasks = mt.SinusoidTasks()
generator = torch.Generator().manual_seed(0)
test_tasks = tasks.sample(200, 10, 10, generator=torch.Generator().manual_seed(1))
iterations = mt.pick(ci=3, laptop=1000)


def test_loss(params):
    return mt.adaptation_curve(model, params, test_tasks, inner_lr=0.02, steps=1)[:, 1].mean().item()


print(f"before meta-training: query MSE after 1 step {test_loss(params):.3f}")
for _ in range(iterations):
    batch = tasks.sample(25, 10, 10, generator=generator)
    x = torch.cat([batch.support_x, batch.query_x], 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    with torch.no_grad():
        adapted = mt.adapt(model, params, x, y, inner_lr=0.02, steps=5, first_order=True)
    params = reptile_update(params, adapted, epsilon=0.5)
print(f"after {iterations} Reptile iterations: query MSE after 1 step {test_loss(params):.3f}")
