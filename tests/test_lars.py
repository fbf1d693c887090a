"""LARS as the references run it: one step of each mode against a hand computation; one class,
common.LARS, that every script uses (no copy of its own to drift)."""

import importlib
import inspect
import types

import pytest
import torch

import common

SCRIPTS = ["simclr", "moco", "byol", "swav", "dino"]


def one_step(lars_cls, w, g, lr, wd, eta, mode, lars=True):
    p = torch.nn.Parameter(w.clone())
    opt = lars_cls(
        [{"params": [p], "lars": lars}], lr=lr, momentum=0.9, weight_decay=wd, eta=eta, mode=mode
    )
    p.grad = g.clone()
    opt.step()
    return p.detach()


@pytest.mark.parametrize("script", SCRIPTS)
def test_lars_modes_match_a_hand_computation(script):
    assert not hasattr(importlib.import_module(script), "LARS"), (
        f"{script}.py has a LARS of its own"
    )
    LARS = common.LARS
    torch.manual_seed(0)
    w, g = torch.randn(8, 4), 0.001 * torch.randn(8, 4)
    wn, gn = w.norm().item(), g.norm().item()
    wd, eta = 1e-4, 0.02
    # official (SimCLR/BYOL/MoCo v3 code): trust = eta ||w|| / ||g + wd w||, uncapped
    d = g + wd * w
    expect = w - 0.4 * (eta * wn / d.norm().item()) * d
    assert torch.allclose(one_step(LARS, w, g, 0.4, wd, eta, "official"), expect, atol=1e-7)
    # clip (solo-learn's lars.py): the step is min(eta ||w|| / (||g|| + wd ||w||), lr) * d
    trust = eta * wn / (gn + wd * wn)
    assert trust > 0.4  # here the cap binds: the layer gets the plain SGD step lr * d
    assert torch.allclose(one_step(LARS, w, g, 0.4, wd, eta, "clip"), w - 0.4 * d, atol=1e-7)
    big = 100 * g  # here it does not: the step is trust * d, below lr * d
    trust = eta * wn / (big.norm().item() + wd * wn)
    assert trust < 0.4
    db = big + wd * w
    assert torch.allclose(one_step(LARS, w, big, 0.4, wd, eta, "clip"), w - trust * db, atol=1e-6)
    # lars=False groups (biases, norms): plain SGD, no adaptation
    # (the group's wd is 0 in param_groups)
    assert torch.allclose(
        one_step(LARS, w, g, 0.4, 0.0, eta, "clip", lars=False), w - 0.4 * g, atol=1e-7
    )
    with pytest.raises(ValueError):
        LARS([torch.nn.Parameter(w)], lr=0.1, mode="other")


def test_every_script_uses_the_one_lars():
    for script in SCRIPTS:
        text = inspect.getsource(importlib.import_module(script))
        assert "common.LARS(" in text and "class LARS" not in text, f"{script}.py"


@pytest.mark.parametrize("mode", ["official", "clip"])
def test_a_groups_lr_scale_holds_after_the_trust_ratio(mode):
    """The attention head's group (lr_scale, set by Run.schedule) steps lr_scale times what a core
    group with the same weights and gradient steps, in both modes; in clip mode too, where the
    cap used to compare the trust with the scaled lr, so the head got 0.42x the core's step at
    ||g|| / ||w|| = 10 instead of 0.0083x (issue 34, point 3)."""
    torch.manual_seed(0)
    w = torch.randn(16, 8)
    g = torch.randn(16, 8)
    g = g * (10 * w.norm() / g.norm())  # ||g|| / ||w|| = 10
    core, head = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    scale = 0.03 / 3.6
    opt = common.LARS(
        [{"params": [core]}, {"params": [head], "lr_scale": scale}],
        lr=0.0,
        weight_decay=1e-4,
        eta=0.02,
        mode=mode,
    )
    run = types.SimpleNamespace(total=100, warmup=0, base_lr=0.4)
    common.Run.schedule(run, opt, 0)  # as every script sets the lrs, each step
    assert opt.param_groups[1]["lr"] == pytest.approx(scale * opt.param_groups[0]["lr"])
    core.grad, head.grad = g.clone(), g.clone()
    opt.step()
    step_core, step_head = (w - core.detach()).norm(), (w - head.detach()).norm()
    assert step_core > 0
    assert (step_head / step_core).item() == pytest.approx(scale, rel=1e-4)
