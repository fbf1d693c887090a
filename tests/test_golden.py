"""Pinned losses: a short run of every method (and of both add-ons) gives the per-epoch losses it
gave when they were recorded, so that no later change drifts what a script computes silently.
The runs are benchmarks/golden.py's (2 epochs of 3 steps on digits at 16 px, resnet18-eighth),
here in this process; golden.py itself compares every tensor bit for bit on one machine, while
the tolerance here lets another CPU's rounding pass."""

import importlib
import os
import sys

import pytest
import torch

from conftest import REPO, read_metrics

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import golden  # noqa: E402

PINNED = {  # benchmarks/golden.py's runs, recorded before the run-harness refactor (4d94942)
    # re-pinned for issue 34's default head (--projector solo-learn): 3.7061, 3.6800
    "simclr": [3.4945878982543945, 3.4176559448242188],
    "mocov2": [2.4617528915405273, 4.078591346740723],
    "mocov3": [2.531674385070801, 2.431056340535482],
    "byol": [4.170895258585612, 3.566307703653971],
    "simsiam": [0.018588372816642124, 0.012960662444432577],
    "swav": [4.7857100168863935, 4.6087392171223955],
    "dino": [4.413317362467448, 3.3511603673299155],
    "simclr_qscore": [3.4923839569091797, 3.4347025553385415],  # the same: 3.7231, 3.7407
    # re-pinned for issue 34 (Eq. 3's mask; the head's lr scale after LARS's clip): 5.6883, 5.3845
    "swav_xattn": [5.685904184977214, 5.236191749572754],
}


@pytest.fixture
def one_thread():
    """The recording's thread count: with 2 threads the sums of a convolution run in another
    order, and after a few LARS steps of a batch of 16 the losses part by ~0.2%."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(PINNED))
def test_per_epoch_losses_are_the_recorded_ones(name, tmp_path, one_thread):
    script, extra = golden.RUNS[name]
    mod = importlib.import_module(script)
    argv = golden.BASE + golden.NARROW[script] + extra + ["--knn-every", "0"]
    assert mod.main(mod.parse_args(argv + ["--run-dir", str(tmp_path)])) == 0
    first, second = (m["loss"] for m in read_metrics(tmp_path))
    # epoch 1 is a few steps from the seed's weights: tight; epoch 2 carries another CPU's
    # rounding through 3 more updates: looser, still far below what a changed loss or schedule does
    assert first == pytest.approx(PINNED[name][0], rel=1e-4), name
    assert second == pytest.approx(PINNED[name][1], rel=2e-2), name
