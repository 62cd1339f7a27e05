# %% [markdown]
# # Exercise 6 · Prototypical Network logits

# %% [markdown] tags=["student-only"]
# *Goes with course notebook [06_maml_omniglot](../notebooks/06_maml_omniglot.ipynb).*
#
# **How to.** Write the function in the cell marked `# YOUR CODE HERE`, run that cell, then run the
# check cell below it: it names what is wrong, with a hint, or prints one line starting with ✔.
# The worked solution is in
# [`solutions/06_protonet_logits.ipynb`](solutions/06_protonet_logits.ipynb); try first.

# %% [markdown] tags=["solution-only"]
# *Goes with course notebook [06_maml_omniglot](../../notebooks/06_maml_omniglot.ipynb).*
#
# **Solution copy**, generated from `exercises/src/06_protonet_logits.py`. The exercise itself is
# [`../06_protonet_logits.ipynb`](../06_protonet_logits.ipynb).

# %% [markdown]
# A Prototypical Network (Snell, Swersky & Zemel, 2017) embeds every picture with a network
# $f_\phi$ and represents class $c$ of an episode by its **prototype**, the mean embedding of its
# support examples:
#
# $$
# p_c = \frac{1}{|S_c|} \sum_{x_i \in S_c} f_\phi(x_i), \qquad S_c = \{x_i \in S : y_i = c\}.
# $$
#
# A query $x$ gets the logits $\ell_c(x) = -\lVert f_\phi(x) - p_c \rVert^2$ (negative **squared**
# Euclidean distance), so the softmax over $c$ puts most probability on the nearest prototype.
# Training minimises the cross-entropy of these logits on the query labels, through the embeddings.

# %%
import torch
import torch.nn.functional as F

import metatut as mt
from metatut.checks_fewshot import check_protonet_logits

# %% [markdown]
# ## Your turn
#
# One episode, already embedded: `support [N*K, D]` with labels `support_labels [N*K]` in
# $0..N-1$ (**in any order**: do not assume the support set is sorted by class), `query [M, D]`.
# Return the logits `[M, N]`. Keep everything differentiable (no `.detach()`, no `.item()`).
# Useful: boolean indexing `support[support_labels == c]`, `.mean(dim=0)`, `torch.stack`,
# broadcasting `query[:, None, :] - prototypes[None, :, :]`.

# %%
def protonet_logits(support, support_labels, query, n_way):
    """Logits [M, N] = -squared distance of each query embedding to each class prototype.

    support: [N*K, D] embeddings; support_labels: [N*K] int64 in 0..n_way-1 (any order);
    query: [M, D] embeddings. Prototype c = mean of the support embeddings labelled c.
    """
    ### BEGIN SOLUTION
    prototypes = torch.stack([support[support_labels == c].mean(dim=0) for c in range(n_way)])   # [N, D]
    return -(query[:, None, :] - prototypes[None, :, :]).pow(2).sum(dim=-1)                       # [M, N]
    ### END SOLUTION

# %% [markdown]
# ## Check

# %% tags=["check"]
check_protonet_logits(protonet_logits)

# %% [markdown]
# ## Try it
#
# A few meta-iterations of a ProtoNet on synthetic episodes: each class is a random point in the
# plane, its examples noisy copies of it, and the "embedding network" a small MLP. The loss is the
# cross-entropy of your logits; it falls as the network learns an embedding in which examples sit
# close to their class's prototype. (Notebook 06 trains the same objective on Omniglot with
# `mt.protonet_objective`.)

# %% tags=["demo"]
generator = torch.Generator().manual_seed(0)
embed = mt.mlp(2, (32,), 16, seed=0)
optimizer = torch.optim.Adam(embed.parameters(), lr=1e-2)
n_way, k_shot, q_query = 5, 1, 5
iterations = mt.pick(ci=20, laptop=200)
for step in range(1, iterations + 1):
    centres = 3 * torch.randn(n_way, 2, generator=generator)
    support_labels = torch.arange(n_way).repeat_interleave(k_shot)
    query_labels = torch.arange(n_way).repeat_interleave(q_query)
    support = centres[support_labels] + torch.randn(n_way * k_shot, 2, generator=generator)
    query = centres[query_labels] + torch.randn(n_way * q_query, 2, generator=generator)
    logits = protonet_logits(embed(support), support_labels, embed(query), n_way)
    loss = F.cross_entropy(logits, query_labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step == 1 or step % max(1, iterations // 5) == 0:
        accuracy = (logits.argmax(-1) == query_labels).float().mean().item()
        print(f"iteration {step:3d}: loss {loss.item():.3f}, query accuracy {accuracy:.2f}")
