"""LARS as the references run it: one step of each mode against a hand computation; one class,
common.LARS, that every script uses (no copy of its own to drift)."""

import importlib
import inspect

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
