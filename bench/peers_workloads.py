"""The benchmark's workloads W1-W3: network, loss, inner loop and a fixed list of meta-batches."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peers_common import DEFAULTS, mt


@dataclass
class Workload:
    """A MAML problem: network template, loss, inner loop, and a fixed list of meta-batches."""

    key: str
    title: str
    model: nn.Module  # metatut's network; a stateless template for the functional metatut paths
    loss_fn: object
    inner_lr: float
    inner_steps: int
    batches: list
    peer_names: dict[str, str]  # metatut parameter name -> parameter name in the peers' network
    build_peer_net: object      # () -> nn.Module with the same initial weights as ``model``
    defaults: tuple[int, int, int]
    notes: list[str] = field(default_factory=list)

    @property
    def param_names(self) -> list[str]:
        return [name for name, _ in self.model.named_parameters()]


def plain_conv4(source: nn.Module) -> tuple[nn.Sequential, dict[str, str]]:
    """The peers' network: conv4 as one ``nn.Sequential`` (as in their examples), holding a copy of
    ``source``'s weights (a ``metatut.Conv4``); returns it with the metatut -> Sequential name map."""
    layers: list[nn.Module] = []
    channels, hidden = source.in_channels, source.hidden
    names = {}
    for block in range(4):
        first = len(layers)
        layers += [nn.Conv2d(channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden, track_running_stats=False),
                   nn.ReLU(), nn.MaxPool2d(2)]
        for offset in (0, 1):  # 0: convolution, 1: batch norm
            for tensor in ("weight", "bias"):
                names[f"features.{block}.{offset}.{tensor}"] = f"{first + offset}.{tensor}"
        channels = hidden
    layers += [nn.Flatten(), nn.Linear(source.embedding_dim, source.num_classes)]
    for tensor in ("weight", "bias"):
        names[f"head.{tensor}"] = f"{len(layers) - 1}.{tensor}"
    net = nn.Sequential(*layers)
    net.load_state_dict({names[name]: value for name, value in source.state_dict().items()}, strict=True)
    return net, names


def sinusoid_workload(device: torch.device, seed: int) -> Workload:
    model = mt.mlp(seed=seed).to(device)
    generator = mt.make_generator(seed + 1, "cpu")
    batches = [mt.SinusoidTasks().sample(25, 10, 10, generator=generator).to(device) for _ in range(8)]
    return Workload(
        key="W1", title="W1: sinusoid regression, 1-40-40-1 ReLU MLP, meta-batch 25, K = 10 + 10 query, "
                        "1 inner step, alpha = 0.01, MSE",
        model=model, loss_fn=F.mse_loss, inner_lr=0.01, inner_steps=1, batches=batches,
        peer_names={name: name for name, _ in model.named_parameters()},
        build_peer_net=lambda: copy.deepcopy(model), defaults=DEFAULTS["W1"])


_OMNIGLOT_CACHE: dict = {}


def omniglot_batches(device: torch.device, seed: int, count: int = 4) -> tuple[list, str]:
    """``count`` meta-batches of 32 five-way one-shot episodes with 15 queries per class, and where the
    images came from (cached: W2 and W3 share them)."""
    key = (str(device), seed, count)
    if key not in _OMNIGLOT_CACHE:
        from metatut.data import load_omniglot, offline_omniglot_dir
        root = offline_omniglot_dir()
        images = load_omniglot("small", root=root, download=root is None)
        generator = mt.make_generator(seed + 1, "cpu")
        batches = [mt.sample_episodes(images, 32, 5, 1, 15, generator=generator).to(device) for _ in range(count)]
        source = f"{root}" if root is not None else "metatut's data directory (downloaded)"
        _OMNIGLOT_CACHE[key] = batches, f"{len(images)} characters of the 'small' background sets, from {source}"
    return _OMNIGLOT_CACHE[key]


def omniglot_workload(key: str, device: torch.device, seed: int) -> Workload:
    steps = 1 if key == "W2" else 5
    model = mt.conv4(5, seed=seed).to(device)
    template, names = plain_conv4(model)
    template = template.to(device)
    batches, source = omniglot_batches(device, seed)
    return Workload(
        key=key, title=f"{key}: Omniglot 5-way 1-shot, conv4, meta-batch 32, 15 queries per class, "
                       f"{steps} inner step{'s' if steps > 1 else ''}, alpha = 0.4, cross-entropy",
        model=model, loss_fn=F.cross_entropy, inner_lr=0.4, inner_steps=steps,
        batches=batches, peer_names=names, build_peer_net=lambda: copy.deepcopy(template), defaults=DEFAULTS[key],
        notes=[f"images: Omniglot, {source}; {len(batches)} fixed meta-batches used in turn by every implementation"])


def build_workload(key: str, device: torch.device, seed: int) -> Workload:
    return sinusoid_workload(device, seed) if key == "W1" else omniglot_workload(key, device, seed)

