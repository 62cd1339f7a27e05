# %% [markdown]
# # Exercise 7 · Capstone: MAML on Omniglot from your own pieces

# %% [markdown] tags=["student-only"]
# *Goes with course notebook [07_family_omniglot](../notebooks/07_family_omniglot.ipynb) (the end of the Omniglot part); uses your answers to
# exercises [2](02_inner_step.ipynb), [3](03_maml_loss.ipynb) and [5](05_episode_sampling.ipynb).*
#
# **How to.** Fill in each cell marked `# YOUR CODE HERE` (paste your earlier answers where the text says so),
# run it, then run the check cell below it: it names what is wrong, with a hint, or prints one line starting
# with ✔. Then run the training and evaluation cells and answer the questions at the end about your own curves.
# The worked solution is in
# [`solutions/07_capstone_maml_omniglot.ipynb`](solutions/07_capstone_maml_omniglot.ipynb); try first.

# %% [markdown] tags=["solution-only"]
# *Goes with course notebook [07_family_omniglot](../../notebooks/07_family_omniglot.ipynb).*
#
# **Solution copy**, generated from `exercises/src/07_capstone_maml_omniglot.py`. The exercise itself is
# [`../07_capstone_maml_omniglot.ipynb`](../07_capstone_maml_omniglot.ipynb).

# %% [markdown]
# Notebook 06 trained MAML on Omniglot with the library. Here you build the same thing from your own pieces,
# train it at a small budget, and read your own curves. Second-order MAML (Finn, Abbeel & Levine, ICML 2017,
# [arXiv 1703.03400](https://arxiv.org/abs/1703.03400)) minimises, over meta-batches of $T$ episodes drawn from
# the **training** characters,
#
# $$
# \mathcal{L}(\theta) = \frac{1}{T} \sum_{t=1}^{T} L_{Q_t}\big(\theta'_t\big), \qquad
# \theta'_t = \theta - \alpha \, \nabla_\theta L_{S_t}(\theta),
# $$
#
# where $L_S$ and $L_Q$ are now cross-entropies of the support and query pictures of an N-way K-shot episode.
# The model is judged on episodes of **held-out** characters that it never saw in training: after $s$ SGD steps
# of size $\alpha$ on each episode's support set, how many of its query pictures does it label correctly?
#
# The pieces:
#
# 1. `inner_step`: exercise 2, with one more argument, `loss_fn`;
# 2. `maml_loss`: exercise 3, with `loss_fn` and `create_graph` (second order by default);
# 3. `sample_episode`: exercise 5, unchanged;
# 4. `train`: the meta-training loop (new);
# 5. `evaluate`: accuracy on held-out characters after 0, 1, ..., $s$ test-time steps (new).
#
# Each piece has a check cell. Then you train second-order and first-order MAML at the same small budget and
# answer three questions about the curves.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display  # noqa: F401 (the worked answers display generated text)

import metatut as mt
from metatut.checks import check_inner_step, check_maml_loss
from metatut.checks_fewshot import check_episode_sampler
from metatut.course.checks_capstone import check_capstone, check_train
from metatut.data import SMALL_ZIPS, fraction_split, load_omniglot, offline_omniglot_dir

torch.set_num_threads(1)          # small convolutions: one thread is fastest on a busy CPU
folder = offline_omniglot_dir(SMALL_ZIPS)         # the course's offline copy, or None: downloaded once
data = load_omniglot("small", root=folder, download=folder is None)
split = fraction_split(data, seed=0)              # characters: train (4 rotations each) / validation / test
print(f"budget profile {mt.profile()!r}; classes: {len(split.train)} train, {len(split.val)} validation, "
      f"{len(split.test)} test")

N_WAY, K_SHOT, Q_QUERY = 5, 1, 5    # 5-way 1-shot episodes, 5 query pictures per class
INNER_LR = 0.4                      # alpha, the paper's value for 5-way Omniglot; one inner step in training
TEST_STEPS = 5                      # test-time steps: accuracy after 0, 1, ..., 5 steps
META_BATCH, META_LR = 4, 0.01      # episodes per meta-batch; Adam's step size
HIDDEN = 8                          # filters per conv layer (the paper: 64)
STEPS = mt.pick(ci=100, laptop=500)
TEST_EPISODES = mt.pick(ci=100, laptop=300)

# %% [markdown]
# ## 1. One inner step
#
# Paste your `inner_step` from exercise 2 and give it one more argument, `loss_fn`, the task loss. Its default
# `F.mse_loss` keeps the check of exercise 2 valid; for Omniglot you will pass `F.cross_entropy`, which takes the
# logits `f(params, x)` of shape `[N*K, N]` and the labels `y` of shape `[N*K]`.

# %%
def inner_step(f, params, x, y, inner_lr, create_graph, loss_fn=F.mse_loss):
    """One SGD step on one task's support set: theta' = theta - inner_lr * grad loss_fn(f(theta, x), y).

    Returns a new dict; differentiable through the gradient when create_graph is True.
    """
    ### BEGIN SOLUTION
    loss = loss_fn(f(params, x), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    return {name: p - inner_lr * g for (name, p), g in zip(params.items(), grads, strict=True)}
    ### END SOLUTION

# %% tags=["check"]
check_inner_step(inner_step)

# %% [markdown]
# ## 2. The MAML loss
#
# Your `maml_loss` from exercise 3, built on `inner_step`, with two more arguments: `loss_fn` (as above) and
# `create_graph`. `True` (the default) is second-order MAML; `False` is first-order MAML, the same loop with the
# inner gradient treated as a constant. The `batch` is a `metatut.TaskBatch`; on Omniglot `support_x[t]` is
# `[N*K, 1, 28, 28]` and `support_y[t]` is `[N*K]`.

# %%
def maml_loss(f, params, batch, inner_lr, loss_fn=F.mse_loss, create_graph=True):
    """MAML meta-loss with one inner step: mean over the tasks of the query loss after adaptation.

    Second order when create_graph is True, first order when False. Returns a 0-dim tensor.
    """
    ### BEGIN SOLUTION
    query_losses = []
    for t in range(batch.num_tasks):
        adapted = inner_step(f, params, batch.support_x[t], batch.support_y[t], inner_lr, create_graph, loss_fn)
        query_losses.append(loss_fn(f(adapted, batch.query_x[t]), batch.query_y[t]))
    return torch.stack(query_losses).mean()
    ### END SOLUTION

# %% tags=["check"]
check_maml_loss(maml_loss)

# %% [markdown]
# ## 3. Episodes
#
# Paste your `sample_episode` from exercise 5: N classes drawn at random, K + Q distinct drawings of each,
# pictures as float32 in $[0, 1]$ with a channel dimension, and the labels **remapped** to $0..N-1$ in the order
# the classes were drawn.

# %%
def sample_episode(images, n_way, k_shot, q_query, generator):
    """One N-way K-shot episode from images [classes, drawings, H, W] (uint8, ink = 255).

    Returns support_x [N*K, 1, H, W], support_y [N*K], query_x [N*Q, 1, H, W], query_y [N*Q].
    """
    ### BEGIN SOLUTION
    classes = torch.randperm(images.shape[0], generator=generator)[:n_way]
    drawings = torch.stack([torch.randperm(images.shape[1], generator=generator)[:k_shot + q_query]
                            for _ in range(n_way)])
    pictures = images[classes[:, None], drawings].float() / 255
    support_x = pictures[:, :k_shot].flatten(0, 1).unsqueeze(1)
    query_x = pictures[:, k_shot:].flatten(0, 1).unsqueeze(1)
    labels = torch.arange(n_way)
    return support_x, labels.repeat_interleave(k_shot), query_x, labels.repeat_interleave(q_query)
    ### END SOLUTION

# %% tags=["check"]
check_episode_sampler(sample_episode)

# %% [markdown]
# A meta-batch stacks `tasks` of your episodes into one `TaskBatch` (given):

# %%
def sample_meta_batch(images, tasks, generator):
    """`tasks` N_WAY-way K_SHOT-shot episodes of `images`, stacked: support_x [tasks, N*K, 1, H, W], ..."""
    episodes = [sample_episode(images, N_WAY, K_SHOT, Q_QUERY, generator) for _ in range(tasks)]
    return mt.TaskBatch(*(torch.stack(parts) for parts in zip(*episodes, strict=True)))

# %% [markdown]
# ## 4. The training loop
#
# Write `train`: `steps` iterations of Adam (learning rate `meta_lr`) on the meta-loss. Each iteration draws a new
# meta-batch with `sample_batch()`, computes `maml_loss` with cross-entropy and the given `create_graph`, and takes
# one optimiser step. Update the tensors of `params` in place (the optimiser does that:
# `torch.optim.Adam(params.values(), lr=meta_lr)`) and return the meta-losses as a list of floats
# (`loss.item()`: a tensor would keep each iteration's graph in memory).
#
# The check runs your loop for a few iterations on a tiny network and compares where the parameters end with Adam
# on the library's second-order (or, with `create_graph=False`, first-order) meta-gradient.

# %%
def train(f, params, sample_batch, steps, inner_lr, meta_lr, create_graph):
    """Meta-train params in place with Adam; return the list of `steps` meta-losses (floats)."""
    ### BEGIN SOLUTION
    optimizer = torch.optim.Adam(params.values(), lr=meta_lr)
    losses = []
    for _ in range(steps):
        batch = sample_batch()
        loss = maml_loss(f, params, batch, inner_lr, loss_fn=F.cross_entropy, create_graph=create_graph)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
    ### END SOLUTION

# %% tags=["check"]
check_train(train)

# %% [markdown]
# ## 5. Train both orders
#
# Second-order and first-order MAML start from the same initial parameters and see the same meta-batches (two
# generators with the same seed), so that the only difference is the Hessian term. The network is the conv4 of
# notebook 06 with few filters; the budget profile sets the number of iterations.

# %%
model = mt.conv4(N_WAY, hidden=HIDDEN, seed=0)
f = mt.functional_model(model)
ORDERS = {"second order": True, "first order": False}       # name -> create_graph
params = {name: mt.init_params(model) for name in (*ORDERS, "untrained")}   # the same initial theta for all

# %% tags=["demo"]
losses, seconds = {}, {}
for name, create_graph in ORDERS.items():
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    losses[name] = train(f, params[name], lambda g=generator: sample_meta_batch(split.train.images, META_BATCH, g),
                         STEPS, INNER_LR, META_LR, create_graph)
    seconds[name] = time.perf_counter() - start
    print(f"{name}: {STEPS} iterations in {seconds[name]:.0f} s; mean meta-loss of the last 10: "
          f"{sum(losses[name][-10:]) / 10:.3f}")

window = max(1, STEPS // 10)
fig, ax = plt.subplots(figsize=(6, 3))
for name, values in losses.items():
    smooth = torch.tensor(values).unfold(0, window, 1).mean(1)
    ax.plot(range(window, STEPS + 1), smooth, label=name)
ax.axhline(torch.log(torch.tensor(float(N_WAY))).item(), color="k", ls="--", lw=1, label=f"ln {N_WAY} (guessing)")
ax.set_xlabel("meta-iteration")
ax.set_ylabel(f"query cross-entropy (mean of {window})")
ax.set_title(f"meta-training, '{mt.profile()}' budget")
ax.legend()
plt.show()

# %% [markdown]
# ## 6. Evaluation on held-out characters
#
# Write `evaluate`: for each of `episodes` episodes of the **test** characters (`split.test.images`), start from
# `params`, record the query accuracy before adaptation and after each of `steps` inner steps on the episode's
# support set (cross-entropy, `create_graph=False`: no meta-gradient is needed here). Return a tensor
# `[episodes, steps + 1]`; its mean over the episodes is the accuracy curve, and its spread gives the noise. Score
# the queries under `torch.no_grad()`, but not the inner steps (they need gradients).
#
# The check runs your `evaluate` on a stand-in split and verifies that the model was shown test pictures only,
# compares your accuracies on the real split with the library's `mt.adapted_accuracy`, and asks the held-out
# accuracy of your second-order model after one inner step (as many as in meta-training) to clear a bar set well
# below what the worked solution reaches.

# %%
def evaluate(f, params, split, steps, inner_lr, episodes, generator):
    """Accuracy on the query set of each of `episodes` held-out episodes after 0, 1, ..., steps inner steps.

    Episodes: N_WAY-way K_SHOT-shot with Q_QUERY queries per class, from split.test. Returns [episodes, steps + 1].
    """
    ### BEGIN SOLUTION
    theta = {k: v.detach().requires_grad_() for k, v in params.items()}
    table = torch.zeros(episodes, steps + 1)
    for e in range(episodes):
        support_x, support_y, query_x, query_y = sample_episode(split.test.images, N_WAY, K_SHOT, Q_QUERY, generator)
        adapted = theta
        for s in range(steps + 1):
            if s > 0:
                adapted = inner_step(f, adapted, support_x, support_y, inner_lr, False, loss_fn=F.cross_entropy)
            with torch.no_grad():
                table[e, s] = (f(adapted, query_x).argmax(-1) == query_y).float().mean()
    return table
    ### END SOLUTION

# %% tags=["check"]
check_capstone(evaluate, model, params["second order"], split, k_shot=K_SHOT, q_query=Q_QUERY, steps=TEST_STEPS,
               inner_lr=INNER_LR)

# %% [markdown]
# ## 7. Your curves
#
# All three are evaluated on the same held-out episodes (one generator seed for all), after 0 to `TEST_STEPS`
# test-time steps, with 95% confidence intervals over the episodes. The yardstick is the **untrained** network
# (the initial $\theta$ of both runs) fine-tuned the same way: what SGD on one picture per class achieves without
# any meta-learning.

# %% tags=["demo"]
tables = {name: evaluate(f, params[name], split, TEST_STEPS, INNER_LR, TEST_EPISODES,
                         torch.Generator().manual_seed(2015)) for name in params}
summaries = {name: [mt.summarize(table[:, s]) for s in range(TEST_STEPS + 1)] for name, table in tables.items()}
for name, rows in summaries.items():
    print(f"{name:12s} " + "  ".join(f"{s} steps {100 * r.mean:4.1f}±{100 * r.ci95:.1f}%" for s, r in enumerate(rows)))

fig, ax = plt.subplots(figsize=(6, 3.4))
steps_axis = list(range(TEST_STEPS + 1))
for name, rows in summaries.items():
    style = dict(color="gray", ls=":") if name == "untrained" else {}
    ax.errorbar(steps_axis, [100 * r.mean for r in rows], yerr=[100 * r.ci95 for r in rows], marker="o", capsize=3,
                label=name, **style)
ax.axhline(100 / N_WAY, color="k", ls="--", lw=1, label=f"chance (1/{N_WAY})")
ax.set_xlabel("test-time inner steps on the support set")
ax.set_ylabel("held-out query accuracy (%)")
ax.set_ylim(0, 100)
ax.set_title(f"{N_WAY}-way {K_SHOT}-shot, {TEST_EPISODES} test episodes, '{mt.profile()}' budget")
ax.legend()
plt.show()

# Before any step the labels of an episode are a random order of its classes: chance, whatever theta is.
for name, rows in summaries.items():
    assert abs(rows[0].mean - 1 / N_WAY) < 0.12, (name, rows[0])
# Meta-learning helps: after one step the second-order model is far above the untrained network after one step.
assert summaries["second order"][1].mean > summaries["untrained"][1].mean + 0.15

# %% [markdown]
# ## 8. Questions about your curves
#
# Answer each in a few sentences, quoting your own numbers.
#
# 1. **Test-time steps.** Why is the accuracy before any step where it is? The model was meta-trained with one
#    inner step: what happens with more steps at test time? Compare with the untrained network: after how many
#    steps does meta-training make the largest difference?
# 2. **First against second order.** At the same budget, which order ended higher after `TEST_STEPS` steps? Is
#    the difference larger than the confidence intervals? How much longer did a second-order run take?
# 3. **Far from the paper.** <!-- cited: Finn, Abbeel & Levine 2017, MAML, Table 1 (5-way 1-shot Omniglot) -->
#    Finn et al. report 98.7 ± 0.4% for 5-way 1-shot Omniglot (their Table 1), with 64 filters, meta-batches
#    of 32 tasks and 60,000 iterations on the full background set.<!-- /cited --> Name the differences between
#    their run and yours that you think matter most.

# %% [markdown] tags=["student-only"]
# Write your answers in a markdown cell of your own below this one.

# %% tags=["solution-only", "demo"]
second, first, untrained = summaries["second order"], summaries["first order"], summaries["untrained"]
gain = second[-1].mean - second[1].mean
noise = (second[-1].ci95 ** 2 + second[1].ci95 ** 2) ** 0.5
difference = second[-1].mean - first[-1].mean
higher, lower = (second[-1], first[-1]) if difference > 0 else (first[-1], second[-1])
overlap = higher.mean - higher.ci95 <= lower.mean + lower.ci95
ratio = seconds["second order"] / seconds["first order"]
window = max(1, STEPS // 10)
tail = [sum(losses["second order"][i:i + window]) / window for i in (STEPS - 2 * window, STEPS - window)]
answers = f"""
**1. Test-time steps.** Before adaptation the second-order model scores {100 * second[0].mean:.1f}% and the
first-order one {100 * first[0].mean:.1f}%, against a chance level of {100 / N_WAY:.0f}%. That is no accident:
each episode labels its classes in a random order, so $\\theta$ alone cannot know which output stands for which
class; only the support set says so. One step, the number used in meta-training, lifts the second-order model to
{100 * second[1].mean:.1f}%, and {TEST_STEPS} steps to {100 * second[-1].mean:.1f}%
({'a gain beyond' if gain > noise else 'a change within'} the confidence intervals). Meta-training only asked that
one step from $\\theta$ works well, but nothing stops further steps from descending the support loss further;
as long as that also fits the query pictures better, accuracy keeps rising
({'as it does here' if gain > noise else 'here it barely does'}). With one support picture per class, enough steps
eventually overfit that picture, and the curve levels off or falls. The untrained network, fine-tuned the
same way, scores {100 * untrained[1].mean:.1f}% after one step and {100 * untrained[-1].mean:.1f}% after
{TEST_STEPS}: meta-training is worth {100 * (second[1].mean - untrained[1].mean):.1f} points after one step and
{100 * (second[-1].mean - untrained[-1].mean):.1f} after {TEST_STEPS}, so it matters
{'most after few steps' if second[1].mean - untrained[1].mean > second[-1].mean - untrained[-1].mean
  else 'at least as much after more steps'}.

**2. First against second order.** After {TEST_STEPS} steps second order reaches {100 * second[-1].mean:.1f} ±
{100 * second[-1].ci95:.1f}% and first order {100 * first[-1].mean:.1f} ± {100 * first[-1].ci95:.1f}% (same
initialisation, same {STEPS} meta-batches, same {TEST_EPISODES} test episodes). The
{'second' if difference > 0 else 'first'}-order model is ahead by {100 * abs(difference):.1f} points, and the two
95% intervals {'overlap: this run cannot tell the orders apart' if overlap else
'do not overlap: at this budget the difference is real'}.
The second-order run took {seconds['second order']:.0f} s and the first-order one {seconds['first order']:.0f} s
({ratio:.1f}x){': it also backpropagates through the inner gradient' if ratio > 1.1 else
', too close to separate on a busy machine'}.

**3. Far from the paper.** Your {100 * second[-1].mean:.1f}% against the paper's 98.7% comes from a run that is
smaller in every direction: {STEPS} iterations instead of 60,000, meta-batches of {META_BATCH} episodes instead
of 32, {HIDDEN} filters per layer instead of 64, and the {len(split.train) // 4} training characters of the small
background sets instead of the full background set (the model sees far fewer distinct characters). The
second-order meta-loss averaged {tail[0]:.3f} and then {tail[1]:.3f} over the last two windows of {window}
iterations: {'still falling, so the run stopped before it converged' if tail[1] < tail[0] else
'no longer falling at this width and step size'}.
"""
display(Markdown(answers))
