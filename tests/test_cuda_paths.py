"""The CUDA-only paths, covered on the CPU with stand-ins: no device constant built per batch
(on CUDA each is a blocking host-to-device copy), the losses in float32 under bf16 autocast,
one step of every model in the CUDA configuration (bf16 autocast + channels_last), one decoded
copy of a split, and the set-up checks that only bite under CUDA and several processes."""
import importlib

import pytest
import torch

import common

SCRIPTS = ["simclr", "moco", "byol", "simsiam", "swav", "dino"]
STEP = ["--dataset", "digits", "--image-size", "16", "--batch-size", "4", "--epochs", "1", "--workers", "0",
        "--warmup-epochs", "0", "--knn-every", "0", "--data-path", "tensor"]


def count_device_tensors(monkeypatch):
    """Every later torch.tensor(..., device=...) call appends to the returned list."""
    calls, real = [], torch.tensor

    def counting(*a, **k):
        if k.get("device") is not None:
            calls.append(k["device"])
        return real(*a, **k)

    monkeypatch.setattr(torch, "tensor", counting)
    return calls


def test_augment_builds_no_device_constant_per_batch(monkeypatch):
    """DINO's 2 + 8 crops with every operation (jitter with hue, grey, blur, solarize) and the
    evaluation transform: after the first batch, no torch.tensor with a device."""
    calls = count_device_tensors(monkeypatch)
    views = common.multicrop_views(32, 8, blur_p=(1.0, 0.1, 0.5), solarize_p=(0.0, 0.2, 0.0))
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    per_batch = []
    for _ in range(3):
        before = len(calls)
        for v in views:
            common.augment(x, v, common.STATS["cifar10"], g)
        common.eval_tensor(x, 32, common.STATS["cifar10"], 32)
        per_batch.append(len(calls) - before)
    assert per_batch[1:] == [0, 0], per_batch


@pytest.mark.parametrize("script", ["swav", "dino"])
def test_training_steps_build_no_device_constant(monkeypatch, tmp_path, script):
    """A whole training step (augmentation, forward, loss, optimizer, bookkeeping) of the two
    multi-crop methods: torch.tensor calls with a device, counted between the loader's batches,
    are zero after the first step."""
    mod = importlib.import_module(script)
    calls = count_device_tensors(monkeypatch)
    marks, real_iter = [], common.TrainLoader.__iter__

    def marking(self):
        for batch in real_iter(self):
            marks.append(len(calls))
            yield batch

    monkeypatch.setattr(common.TrainLoader, "__iter__", marking)
    args = mod.parse_args(STEP + ["--steps-per-epoch", "4", "--local-crops", "2", "--run-dir", str(tmp_path)])
    assert mod.main(args) == 0
    assert len(marks) >= 4
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    assert per_step[1:] == [0] * (len(per_step) - 1), per_step
