"""N-way K-shot episodes: shapes, label remapping, disjoint support/query, seeding, argument checks."""
from __future__ import annotations

import pytest
import torch

import metatut as mt

from metatut.tasks.base import TaskBatch
from metatut.tasks.episodes import EpisodeSampler, sample_episodes

CLASSES, PER_CLASS = 12, 20


def coded_images(classes: int = CLASSES, per_class: int = PER_CLASS) -> torch.Tensor:
    """Float images ``[classes, per_class, 3, 3]`` whose pixel (0, 0) encodes the class and (0, 1) the example."""
    images = torch.zeros(classes, per_class, 3, 3)
    images[:, :, 0, 0] = torch.arange(classes).view(-1, 1) / 100
    images[:, :, 0, 1] = torch.arange(per_class).view(1, -1) / 100
    return images


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., 1, 3, 3]`` -> (class ids, example ids) read back from the pixels."""
    return (x[..., 0, 0, 0] * 100).round().long(), (x[..., 0, 0, 1] * 100).round().long()


def test_shapes_and_types():
    batch = sample_episodes(coded_images(), 4, n_way=5, k_shot=2, q_query=3, generator=torch.Generator().manual_seed(0))
    assert isinstance(batch, TaskBatch)
    assert batch.support_x.shape == (4, 10, 1, 3, 3) and batch.query_x.shape == (4, 15, 1, 3, 3)
    assert batch.support_y.shape == (4, 10) and batch.query_y.shape == (4, 15)
    assert batch.support_y.dtype == batch.query_y.dtype == torch.int64
    assert batch.support_x.dtype == torch.float32
    assert batch.info["classes"].shape == (4, 5) and batch.info["examples"].shape == (4, 5, 5)
    assert batch.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert batch.query_y[0].tolist() == [c for c in range(5) for _ in range(3)]


def test_labels_remap_classes_and_support_query_are_disjoint():
    batch = sample_episodes(coded_images(), 50, n_way=5, k_shot=3, q_query=4, generator=torch.Generator().manual_seed(1))
    s_cls, s_ex = decode(batch.support_x)
    q_cls, q_ex = decode(batch.query_x)
    for t in range(50):
        chosen = batch.info["classes"][t]
        assert len(set(chosen.tolist())) == 5                           # N distinct classes
        assert torch.equal(s_cls[t], chosen[batch.support_y[t]])      # label i <-> the i-th drawn class
        assert torch.equal(q_cls[t], chosen[batch.query_y[t]])
        for label in range(5):
            support = s_ex[t][batch.support_y[t] == label].tolist()
            query = q_ex[t][batch.query_y[t] == label].tolist()
            assert len(support) == 3 and len(query) == 4
            assert len(set(support + query)) == 7                     # all distinct: support and query disjoint
            assert support + query == batch.info["examples"][t, label].tolist()


def test_every_class_and_image_gets_drawn():
    batch = sample_episodes(coded_images(), 600, n_way=3, k_shot=1, q_query=1, generator=torch.Generator().manual_seed(2))
    cls, ex = decode(torch.cat([batch.support_x, batch.query_x], 1))
    class_counts = torch.bincount(cls.flatten(), minlength=CLASSES).double()
    expected = cls.numel() / CLASSES                                      # 300 each
    assert ((class_counts - expected).abs() < 0.25 * expected).all()
    assert torch.bincount(ex.flatten(), minlength=PER_CLASS).min() > 0


def test_same_seed_same_episodes():
    images = coded_images()
    a = sample_episodes(images, 3, 5, 1, 5, generator=torch.Generator().manual_seed(7))
    b = sample_episodes(images, 3, 5, 1, 5, generator=torch.Generator().manual_seed(7))
    c = sample_episodes(images, 3, 5, 1, 5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.info["classes"], c.info["classes"])
    sampler = EpisodeSampler(images, n_way=5, k_shot=1, q_query=5, num_tasks=3)
    d = sampler(torch.Generator().manual_seed(7))
    assert torch.equal(d.support_x, a.support_x) and torch.equal(d.query_y, a.query_y)
    assert "5-way 1-shot" in repr(sampler)


def test_uint8_images_are_scaled_to_unit_range():
    images = torch.randint(0, 256, (6, 20, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = sample_episodes(images, 2, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert batch.support_x.dtype == torch.float64 and batch.support_x.shape == (2, 6, 1, 28, 28)
    t, label, k = 1, 2, 1
    c = batch.info["classes"][t, label]
    e = batch.info["examples"][t, label, k]
    assert torch.equal(batch.support_x[t, label * 2 + k, 0], images[c, e].double() / 255)
    assert 0 <= batch.query_x.min() and batch.query_x.max() <= 1


def test_omniglot_images_object_is_accepted():
    from metatut.data import OmniglotImages
    images = torch.randint(0, 256, (30, 20, 28, 28), dtype=torch.uint8)
    data = OmniglotImages(images, tuple(f"A/c{i}" for i in range(30)))
    batch = EpisodeSampler(data, n_way=20, k_shot=5, q_query=15, num_tasks=2)(torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (2, 100, 1, 28, 28) and batch.query_x.shape == (2, 300, 1, 28, 28)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(n_way=13), ValueError, r"n_way must be an int in \[2, 12\]"),      # 1-way: loss exactly 0
    (dict(k_shot=10, q_query=11), ValueError, r"k_shot \+ q_query must be at most 20 .*k_shot=10, q_query=11"),
    (dict(n_way=0), ValueError, "n_way must be an int >= 2"),
    (dict(k_shot=-1), ValueError, "k_shot must be an int >= 1"),
    (dict(q_query=0), ValueError, "q_query must be an int >= 1"),
    (dict(num_tasks=0), ValueError, "num_tasks must be an int >= 1"),
    (dict(k_shot=1.5), TypeError, "k_shot must be an int"),
    (dict(n_way=True), TypeError, "n_way must be an int"),
])
def test_bad_arguments_fail_before_any_sampling(kwargs, error, message):
    settings = dict(num_tasks=2, n_way=5, k_shot=1, q_query=1) | kwargs
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    with pytest.raises(error, match=message):
        sample_episodes(coded_images(), generator=generator, **settings)
    assert torch.equal(generator.get_state(), state)                    # no random numbers were drawn
    with pytest.raises(error, match=message):
        EpisodeSampler(coded_images(), **settings)


def test_bad_images_are_rejected():
    with pytest.raises(TypeError, match=r"images must be a tensor \[classes, images_per_class, H, W\]"):
        sample_episodes(torch.zeros(12, 20, 28), 1, 2, 1, 1)
    with pytest.raises(TypeError, match="uint8 or floating point"):
        sample_episodes(torch.zeros(12, 20, 2, 2, dtype=torch.int32), 1, 2, 1, 1)


def test_held_out_episodes_are_seeded_and_prefix_stable():
    images = torch.randint(0, 256, (30, 20, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    long = mt.held_out_episodes(images, 25, 5, 1, 3, seed=7, chunk=10)
    short = mt.held_out_episodes(images, 12, 5, 1, 3, seed=7, chunk=10)
    assert [b.num_tasks for b in long] == [10, 10, 5] and [b.num_tasks for b in short] == [10, 2]
    assert torch.equal(long[0].support_x, short[0].support_x)
    assert torch.equal(long[1].query_y[:2], short[1].query_y) and torch.equal(long[1].query_x[:2], short[1].query_x)
    assert not torch.equal(mt.held_out_episodes(images, 10, 5, 1, 3, seed=8)[0].support_x, long[0].support_x)
    with pytest.raises(ValueError, match="episodes must be an int >= 1"):
        mt.held_out_episodes(images, 0, 5, 1, 3)


def test_offline_omniglot_dir_follows_the_environment(tmp_path, monkeypatch):
    from metatut.data import offline_omniglot_dir
    for name in ("a.zip", "b.zip"):
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.setenv("METATUT_SHARED_OMNIGLOT", str(tmp_path))
    assert offline_omniglot_dir(("a.zip", "b.zip")) == tmp_path
    assert offline_omniglot_dir(("a.zip", "missing.zip")) != tmp_path  # falls through to the other folders
