# %% [markdown]
# # Exercise 5 · Sampling an N-way K-shot episode

# %% [markdown] tags=["student-only"]
# *Goes with course notebook [05_omniglot_episodes](../notebooks/05_omniglot_episodes.ipynb).*
#
# **How to.** Write the function in the cell marked `# YOUR CODE HERE`, run that cell, then run the
# check cell below it: it names what is wrong, with a hint, or prints one line starting with ✔.
# The worked solution is in
# [`solutions/05_episode_sampling.ipynb`](solutions/05_episode_sampling.ipynb); try first.

# %% [markdown] tags=["solution-only"]
# *Goes with course notebook [05_omniglot_episodes](../../notebooks/05_omniglot_episodes.ipynb).*
#
# **Solution copy**, generated from `exercises/src/05_episode_sampling.py`. The exercise itself is
# [`../05_episode_sampling.ipynb`](../05_episode_sampling.ipynb).

# %% [markdown]
# A few-shot learner is trained and tested on **episodes**: small classification problems built
# from a dataset with many classes. An N-way K-shot episode with $Q$ queries per class
#
# 1. draws $N$ distinct classes at random;
# 2. draws $K + Q$ distinct drawings of each: the first $K$ form the **support set**, the other $Q$
#    the **query set** (so no query picture is ever in the support set);
# 3. labels the classes $0, 1, \dots, N-1$ in the order they were drawn, whatever their index in the
#    dataset. The same character is class 2 in one episode and class 0 in the next: the model must
#    learn each episode's labels from its support set.
#
# The support set has $NK$ pictures with labels $(0, \dots, 0, 1, \dots, 1, \dots)$, each repeated $K$
# times; the query set has $NQ$ pictures, labels repeated $Q$ times.

# %%
import torch

import metatut as mt
from metatut.checks_fewshot import check_episode_sampler

# %% [markdown]
# ## Your turn
#
# `images` is a `uint8` tensor `[classes, drawings, H, W]` (ink = 255), for example Omniglot's
# `[242, 20, 28, 28]`. Return `(support_x, support_y, query_x, query_y)`:
#
# - `support_x [N*K, 1, H, W]` and `query_x [N*Q, 1, H, W]`: float32 pictures in $[0, 1]$ (divide by 255),
#   class by class, with a channel dimension;
# - `support_y [N*K]` and `query_y [N*Q]`: int64 labels in $0..N-1$.
#
# Take every random number from `generator` (`torch.randperm(n, generator=generator)`), so the same
# seed gives the same episode. Useful: `torch.randperm`, advanced indexing
# `images[classes][:, drawings]` or `images[classes[:, None], drawings]`, `flatten`, `unsqueeze`,
# `torch.arange(n).repeat_interleave(k)`.

# %%
def sample_episode(images, n_way, k_shot, q_query, generator):
    """One N-way K-shot episode from images [classes, drawings, H, W] (uint8, ink = 255).

    Returns support_x [N*K, 1, H, W], support_y [N*K], query_x [N*Q, 1, H, W], query_y [N*Q]:
    pictures as float32 in [0, 1], labels int64 in 0..N-1 (the i-th class drawn has label i).
    """
    ### BEGIN SOLUTION
    classes = torch.randperm(images.shape[0], generator=generator)[:n_way]                 # [N]
    drawings = torch.stack([torch.randperm(images.shape[1], generator=generator)[:k_shot + q_query]
                            for _ in range(n_way)])                                        # [N, K+Q]
    pictures = images[classes[:, None], drawings].float() / 255                           # [N, K+Q, H, W]
    support_x = pictures[:, :k_shot].flatten(0, 1).unsqueeze(1)
    query_x = pictures[:, k_shot:].flatten(0, 1).unsqueeze(1)
    labels = torch.arange(n_way)
    return support_x, labels.repeat_interleave(k_shot), query_x, labels.repeat_interleave(q_query)
    ### END SOLUTION

# %% [markdown]
# ## Check

# %% tags=["check"]
check_episode_sampler(sample_episode)

# %% [markdown]
# ## Try it
#
# A 5-way 1-shot episode from Omniglot's small background sets (the course's offline copy, or
# downloaded once into `mt.data_dir()`): one support picture per class on the left, three query
# pictures on the right, each with its label.

# %% tags=["demo"]
import os
from pathlib import Path

import matplotlib.pyplot as plt

from metatut.data import load_omniglot

files = ("images_background_small1.zip", "images_background_small2.zip")
candidates = [Path(os.environ["METATUT_SHARED_OMNIGLOT"])] if os.environ.get("METATUT_SHARED_OMNIGLOT") else []
candidates += [mt.data_dir() / "omniglot", Path(mt.__file__).resolve().parents[2] / "shared" / "data" / "omniglot"]
folder = next((c for c in candidates if all((c / f).is_file() for f in files)), None)
data = load_omniglot("small", root=folder, download=folder is None)

support_x, support_y, query_x, query_y = sample_episode(data.images, 5, 1, 3, torch.Generator().manual_seed(0))
fig, axes = plt.subplots(5, 4, figsize=(3.6, 4.6))
for row in range(5):
    pictures = [(support_x[row], support_y[row])] + [(query_x[3 * row + j], query_y[3 * row + j]) for j in range(3)]
    for col, (picture, label) in enumerate(pictures):
        axes[row, col].imshow(1 - picture[0], cmap="gray", vmin=0, vmax=1)
        axes[row, col].set_title(f"{'support' if col == 0 else 'query'} y={label.item()}", fontsize=7)
        axes[row, col].axis("off")
fig.tight_layout()
plt.show()
