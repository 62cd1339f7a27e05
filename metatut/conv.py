r"""The MAML paper's convolutional network for Omniglot ("conv4").

Four blocks of ``3x3 conv (hidden filters, padding 1) -> batch norm -> ReLU -> 2x2 max-pool`` turn a
``[batch, 1, 28, 28]`` image into ``hidden`` features (28 -> 14 -> 7 -> 3 -> 1), and a linear head maps
them to ``num_classes`` logits (Finn et al., 2017, section 5.2, after Vinyals et al., 2016).
``num_classes=None`` leaves the head out: the network is then an embedding ``[batch, hidden]``, as used
by Prototypical Networks.

Batch normalisation (``batch_norm``), a named setting kept on the model:

* ``'batch'`` (default, as the paper's code): :class:`TaskBatchNorm2d` with ``track_running_stats=False``,
  so the layer always
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

The batched-tasks path (all tasks of a meta-batch at once under ``torch.func.vmap``, the engine's
``vectorize=True``, or ``'auto'`` on a GPU) is exact in second order with ``batch_norm='batch'``:
:class:`TaskBatchNorm2d` then computes batch norm in elementary operations (PyTorch's own kernel under vmap
gives a second-order meta-gradient ~1e-2 off the loop's), and the bias of each convolution, which the batch
statistics cancel, is left out of the convolution (the output is the same function) and tied to the batch
norm's offset with a factor 0, so its meta-gradient is exactly zero.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .engine.execution import tasks_batched
from .validate import check_n_way, check_positive_int

__all__ = ["BATCH_NORM_MODES", "DOWNSAMPLE_MODES", "TaskBatchNorm2d", "Conv4", "conv4"]

BATCH_NORM_MODES = ("batch", "running", "none")
DOWNSAMPLE_MODES = ("maxpool", "stride")


class TaskBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and ``state_dict`` keys) that is exact on the batched-tasks path.

    Its forward is PyTorch's kernel, except on the engine's batched path (:func:`metatut.engine.execution.tasks_batched`:
    inside ``over_tasks(use_vmap=True)``, or on a ``torch.func``-wrapped input) with batch statistics
    (``track_running_stats=False``): there it is batch norm in elementary operations (mean and biased variance over
    ``(N, H, W)``, ``eps`` as PyTorch's), whose second derivative under ``torch.func.vmap`` equals the per-task
    loop's. So it declares itself verified under vmap (``vmap_safe``, read by :mod:`metatut.engine.policy`) only
    with batch statistics; with running statistics it is as unsafe as ``nn.BatchNorm2d``.

    ``forward(x, absorbed_bias=None)``: ``absorbed_bias [C]`` is the bias of a convolution left out before this
    layer (batch statistics cancel it): it joins the offset times 0, the output is unchanged and its gradient is
    exactly zero (:class:`Conv4` does this on the batched path).

    Example::

        >>> from metatut.engine.execution import batched_tasks
        >>> bn = TaskBatchNorm2d(3, track_running_stats=False).double()
        >>> x = torch.rand(4, 3, 5, 5, dtype=torch.float64)
        >>> with batched_tasks():
        ...     by_hand = bn(x)
        >>> torch.allclose(by_hand, bn(x), rtol=1e-12, atol=1e-12), bn.vmap_safe
        (True, True)
        >>> TaskBatchNorm2d(3).vmap_safe                  # running statistics: the loop
        False
    """

    @property
    def vmap_safe(self) -> bool:  # type: ignore[override]
        """True with batch statistics (exact under vmap), False with running statistics."""
        return not self.track_running_stats

    def forward(self, x: Tensor, absorbed_bias: Tensor | None = None) -> Tensor:
        if self.track_running_stats or not tasks_batched(x):
            if absorbed_bias is not None:
                raise ValueError("absorbed_bias is for the batched-tasks path with batch statistics only")
            return super().forward(x)
        self._check_input_dim(x)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        centred = x - mean
        var = centred.square().mean(dim=(0, 2, 3), keepdim=True)
        y = centred * torch.rsqrt(var + self.eps)
        offset = self.bias
        if absorbed_bias is not None:
            offset = absorbed_bias * 0 if offset is None else offset + absorbed_bias * 0
        if self.weight is not None:
            y = y * self.weight.view(1, -1, 1, 1)
        return y + offset.view(1, -1, 1, 1) if offset is not None else y


class Conv4(nn.Module):
    """Four conv blocks and an optional linear head; see the module docstring.

    Input ``[batch, in_channels, image_size, image_size]``; output ``[batch, num_classes]`` logits, or
    ``[batch, embedding_dim]`` features when ``num_classes`` is None. The settings are attributes
    (``batch_norm``, ``downsample``, ``hidden``, ...) and appear in ``repr(model)``. ``model.fast`` (default
    True) pools before the ReLU, the same function a little cheaper; ``False`` runs the blocks as the plain
    ``nn.Sequential`` they are stored as.

    ``vmap_safe = True``: its own forward (shape check, blocks, flatten, head) batches correctly under
    ``torch.func.vmap`` (:mod:`metatut.engine.policy`); its layers are judged one by one, so with batch norm
    the model runs the loop except with ``batch_norm='batch'`` (:class:`TaskBatchNorm2d`, exact under vmap).

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
                layers.append(TaskBatchNorm2d(hidden, track_running_stats=False))
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

    def _features(self, h: Tensor, *, pool_first: bool = True, batched: bool = False) -> Tensor:
        # pool_first: the same function as self.features with max-pool before ReLU: they commute (both are
        # monotone, so the values and the gradient paths are identical) and ReLU, forward and backward, then
        # touches 4x fewer values. (Channels-last layouts were tried too and lost: bench/RESULTS.md.)
        # batched (the batched-tasks path): a convolution followed by batch-statistics TaskBatchNorm2d runs
        # without its bias (cancelled by the batch mean), handed to the batch norm to get an exact zero gradient.
        for block in self.features:
            layers = list(block)
            conv, bn = layers[0], layers[1]
            if batched and isinstance(bn, TaskBatchNorm2d) and bn.vmap_safe:
                h = bn(conv._conv_forward(h, conv.weight, None), absorbed_bias=conv.bias)
                layers = layers[2:]
            if pool_first:
                for layer in layers:
                    if not isinstance(layer, nn.ReLU):
                        h = layer(h)
                h = torch.relu(h)
            else:
                for layer in layers:
                    h = layer(h)
        return h

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, hidden={self.hidden}, batch_norm={self.batch_norm!r}, "
                f"downsample={self.downsample!r}, embedding_dim={self.embedding_dim}")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"Conv4 expects input [batch, {self.in_channels}, {self.image_size}, {self.image_size}] "
                             f"(got {tuple(x.shape)})")
        batched = tasks_batched(x)
        h = self._features(x, pool_first=self.fast, batched=batched) if self.fast or batched else self.features(x)
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
