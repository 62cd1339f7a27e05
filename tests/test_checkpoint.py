"""Checkpoints are atomic, round-trip exactly, and never unpickle arbitrary objects."""
import pickle

import pytest
import torch

import metatut as mt
from metatut import checkpoint as ckpt


class NotAllowed:
    def __reduce__(self):  # would run code if unpickled
        return (print, ("unpickled!",))


def _trained():
    model = mt.mlp(seed=0)
    params = mt.init_params(model)
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    batch = mt.SinusoidTasks().sample(3, 5, generator=mt.make_generator(0))
    for _ in range(3):
        opt.zero_grad()
        mt.maml_loss(model, params, batch, inner_lr=0.01).backward()
        opt.step()
    return model, params, opt, batch


def test_round_trip_restores_params_optimizer_config_and_step(tmp_path):
    model, params, opt, batch = _trained()
    config = {"inner_lr": 0.01, "shots": 10, "name": "sinusoid", "hidden": [40, 40], "extra": {"first_order": False}}
    path = mt.save_checkpoint(tmp_path / "run" / "ckpt.pt", params, optimizer=opt, config=config, step=3)
    loaded = mt.load_checkpoint(path)
    assert loaded["config"] == config and loaded["step"] == 3
    for k in params:
        assert torch.equal(loaded["params"][k], params[k].detach()) and loaded["params"][k].requires_grad
    # continuing from the checkpoint gives exactly what continuing in memory gives
    opt2 = torch.optim.Adam(loaded["params"].values(), lr=1e-3)
    mt.load_checkpoint(path, optimizer=opt2)
    for o, p in ((opt, params), (opt2, loaded["params"])):
        o.zero_grad()
        mt.maml_loss(model, p, batch, inner_lr=0.01).backward()
        o.step()
    for k in params:
        assert torch.equal(loaded["params"][k], params[k])
    assert [p.name for p in tmp_path.joinpath("run").iterdir()] == ["ckpt.pt"]  # no temporary files left


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    _, params, opt, _ = _trained()
    path = mt.save_checkpoint(tmp_path / "c.pt", params, config={"v": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        mt.save_checkpoint(path, params, config={"v": 2})
    monkeypatch.undo()
    assert mt.load_checkpoint(path)["config"] == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_loading_refuses_arbitrary_pickles(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "params": {}, "payload": NotAllowed()}, path)
    with pytest.raises(pickle.UnpicklingError):
        mt.load_checkpoint(path)
    assert "unpickled!" not in capsys.readouterr().out


def test_bad_checkpoints_and_configs(tmp_path):
    _, params, _, _ = _trained()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        mt.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a metatut checkpoint"):
        mt.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(TypeError, match=r"config\['fn'\] must hold only"):
        mt.save_checkpoint(tmp_path / "x.pt", params, config={"fn": print})
    assert not (tmp_path / "x.pt").exists()
