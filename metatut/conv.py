r"""The MAML paper's convolutional network for Omniglot ("conv4").

Four blocks of ``3x3 conv (hidden filters, padding 1) -> batch norm -> ReLU -> 2x2 max-pool`` turn a
``[batch, 1, 28, 28]`` image into ``hidden`` features (28 -> 14 -> 7 -> 3 -> 1), and a linear head maps
them to ``num_classes`` logits (Finn et al., 2017, section 5.2, after Vinyals et al., 2016).
``num_classes=None`` leaves the head out: the network is then an embedding ``[batch, hidden]``, as used
by Prototypical Networks.

Batch normalisation (``batch_norm``), a named setting kept on the model:

* ``'batch'`` (default, as the paper's code): ``track_running_stats=False``, so the layer always
  normalises with the statistics of the batch it is given, in training **and** evaluation mode. At
  test time this is *transductive*: the query images of an episode are normalised together, so the
  prediction for one query depends on the other queries in the same forward pass. Evaluate all of an
  episode's queries in one batch (as the paper does), and do not compare against methods that classify
  each query alone without saying so.
* ``'running'``: ordinary ``nn.BatchNorm2d``: batch statistics in training mode (which also update
  running averages in the module's buffers, even inside ``functional_call``), running averages in
  ``model.eval()`` mode, so test predictions are per-example.
* ``'none'``: no normalisation.

The paper's code for Omniglot actually downsamples with stride-2 convolutions and averages the last
feature map instead of max-pooling (``downsample='stride'``: 28 -> 14 -> 7 -> 4 -> 2, then the mean);
the default follows the paper's text. Its batch norm learns an offset but no scale; ours learns both.
Weights use PyTorch's default initialisation.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .validate import check_n_way, check_positive_int

__all__ = ["BATCH_NORM_MODES", "DOWNSAMPLE_MODES", "Conv4", "conv4"]

BATCH_NORM_MODES = ("batch", "running", "none")
DOWNSAMPLE_MODES = ("maxpool", "stride")


class Conv4(nn.Module):
    """Four conv blocks and an optional linear head; see the module docstring.

    Input ``[batch, in_channels, image_size, image_size]``; output ``[batch, num_classes]`` logits, or
    ``[batch, embedding_dim]`` features when ``num_classes`` is None. The settings are attributes
    (``batch_norm``, ``downsample``, ``hidden``, ...) and appear in ``repr(model)``. ``model.fast`` (default
    True) pools before the ReLU, the same function a little cheaper; ``False`` runs the blocks as the plain
    ``nn.Sequential`` they are stored as.

    ``vmap_safe = True``: its own forward (shape check, blocks, flatten, head) batches correctly under
    ``torch.func.vmap`` (:mod:`metatut.engine.policy`); its layers are judged one by one, so with batch norm
    the model still runs the per-task loop.

    Example::

        >>> model = Conv4(5, hidden=8, image_size=16)
        >>> model(torch.rand(2, 1, 16, 16)).shape                          # [batch, num_classes] logits
        torch.Size([2, 5])
        >>> Conv4(None, hidden=8, image_size=16)(torch.rand(2, 1, 16, 16)).shape   # [batch, embedding_dim]
        torch.Size([2, 8])
    """

    #: Honoured by :func:`metatut.engine.policy.judge` (a class attribute, as for any user's module).
    vmap_safe = True

    def __init__(self, num_classes: int | None = 5, *, hidden: int = 64, in_channels: int = 1,
                 image_size: int = 28, batch_norm: str = "batch", downsample: str = "maxpool") -> None:
        super().__init__()
        if num_classes is not None:
            check_n_way(num_classes, "num_classes")
        check_positive_int("hidden", hidden)
        check_positive_int("in_channels", in_channels)
        check_positive_int("image_size", image_size, minimum=16)
        if batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"batch_norm must be one of {BATCH_NORM_MODES} (got {batch_norm!r})")
        if downsample not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLE_MODES} (got {downsample!r})")
        self.num_classes, self.hidden, self.in_channels, self.image_size = num_classes, hidden, in_channels, image_size
        self.batch_norm, self.downsample = batch_norm, downsample
        #: False evaluates ``self.features`` as a plain ``nn.Sequential`` (the reference the tests compare to).
        self.fast = True
        blocks, size, channels = [], image_size, in_channels
        for _ in range(4):
            stride = 2 if downsample == "stride" else 1
            layers: list[nn.Module] = [nn.Conv2d(channels, hidden, 3, stride=stride, padding=1)]
            if batch_norm == "batch":
                layers.append(nn.BatchNorm2d(hidden, track_running_stats=False))
            elif batch_norm == "running":
                layers.append(nn.BatchNorm2d(hidden))
            layers.append(nn.ReLU())
            if downsample == "maxpool":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                size = (size + 1) // 2
            blocks.append(nn.Sequential(*layers))
            channels = hidden
        self.features = nn.Sequential(*blocks)
        self.final_size = size
        self.embedding_dim = hidden * (size * size if downsample == "maxpool" else 1)
        self.head = nn.Linear(self.embedding_dim, num_classes) if num_classes is not None else None

    def _features(self, h: Tensor) -> Tensor:
        # The same function as self.features with max-pool before ReLU: they commute (both are monotone, so
        # the values and the gradient paths are identical) and ReLU, forward and backward, then touches 4x
        # fewer values. (Channels-last layouts were tried too and lost: bench/RESULTS.md.)
        for block in self.features:
            for layer in block:
                if not isinstance(layer, nn.ReLU):
                    h = layer(h)
            h = torch.relu(h)
        return h

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, hidden={self.hidden}, batch_norm={self.batch_norm!r}, "
                f"downsample={self.downsample!r}, embedding_dim={self.embedding_dim}")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"Conv4 expects input [batch, {self.in_channels}, {self.image_size}, {self.image_size}] "
                             f"(got {tuple(x.shape)})")
        h = self._features(x) if self.fast else self.features(x)
        h = h.mean(dim=(2, 3)) if self.downsample == "stride" else h.flatten(1)
        return self.head(h) if self.head is not None else h


def conv4(num_classes: int | None = 5, *, hidden: int = 64, in_channels: int = 1, image_size: int = 28,
          batch_norm: str = "batch", downsample: str = "maxpool", seed: int | None = None) -> Conv4:
    """Build :class:`Conv4`; ``seed`` makes the initialisation reproducible without touching the global RNG.

    Example::

        >>> model = conv4(3, hidden=4, image_size=16, batch_norm="none", seed=0)
        >>> torch.equal(model.head.weight, conv4(3, hidden=4, image_size=16, batch_norm="none", seed=0).head.weight)
        True
        >>> model.batch_norm, model.embedding_dim, model.head
        ('none', 4, Linear(in_features=4, out_features=3, bias=True))
    """
    if seed is None:
        return Conv4(num_classes, hidden=hidden, in_channels=in_channels, image_size=image_size,
                     batch_norm=batch_norm, downsample=downsample)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None (got {seed!r})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Conv4(num_classes, hidden=hidden, in_channels=in_channels, image_size=image_size,
                     batch_norm=batch_norm, downsample=downsample)
