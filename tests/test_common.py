"""common.py: data, views, loader, backbones, memory bank (k-means, kNN), Grad-CAM."""

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

import common
from conftest import run, run_here, spawn


def test_digits_is_deterministic_split_with_labels():
    train, test = (
        common.make_dataset("digits", "unused", True),
        common.make_dataset("digits", "unused", False),
    )
    assert (len(train), len(test)) == (1437, 360)
    img, y = train[0]
    assert img.size == (32, 32) and img.mode == "RGB" and 0 <= y < 10
    assert np.array_equal(common.make_dataset("digits", "x", True).data, train.data)
    assert sorted(set(train.targets)) == list(range(10))


def test_bad_datasets_raise_one_sentence(tmp_path):
    with pytest.raises(common.UserError, match="unknown dataset"):
        common.make_dataset("mnist", str(tmp_path))
    with pytest.raises(common.UserError, match="train"):
        common.make_dataset("folder", str(tmp_path / "nowhere"))
    (tmp_path / "train").mkdir()
    with pytest.raises(common.UserError, match="val"):
        common.make_dataset("folder", str(tmp_path))


def test_views_follow_the_papers():
    v1, v2 = common.simclr_views(
        32
    )  # SimCLR App. A = solo-learn's symmetric.yaml, blur included at 32 px
    assert (
        v1 == v2
        and v1.scale == (0.08, 1.0)
        and v1.jitter == (0.8, 0.8, 0.8, 0.2)
        and v1.blur_p == 0.5
    )
    m = common.simclr_views(32, crop_min=0.2, strength=0.5, blur_p=0.0)[0]  # MoCo v2's jitter
    assert m.scale == (0.2, 1.0) and m.jitter == (0.4, 0.4, 0.4, 0.1) and m.blur_p == 0.0
    b1, b2 = common.byol_views(224)
    assert (b1.blur_p, b2.blur_p, b1.solarize_p, b2.solarize_p) == (1.0, 0.1, 0.0, 0.2)
    assert b1.jitter == (0.4, 0.4, 0.2, 0.1)
    crops = common.multicrop_views(224, 6)
    assert [c.size for c in crops] == [224, 224] + [96] * 6
    assert [c.size for c in common.multicrop_views(32, 2)] == [32, 32, 16, 16]
    d = common.multicrop_views(224, 2, blur_p=(1.0, 0.1, 0.5), solarize_p=(0.0, 0.2, 0.0))
    assert [(c.blur_p, c.solarize_p) for c in d] == [(1.0, 0.0), (0.1, 0.2), (0.5, 0.0), (0.5, 0.0)]


def test_blur_kernel_is_a_gaussian_on_small_crops():
    # 10% of the side on ImageNet crops (SimCLR: 23 at 224 px), at least +-3 sigma_max = 13 taps
    # below, never wider than the crop (reflect padding)
    assert [common.blur_kernel(s) for s in (224, 96, 32, 16, 8)] == [23, 13, 13, 13, 7]


def test_zero_init_residual_starts_each_block_as_identity():
    for name, last in (("resnet18", "bn2"), ("resnet50", "bn3")):
        net = common.build_backbone(name, small_images=True, zero_init_residual=True)
        assert all(getattr(blk, last).weight.abs().sum() == 0 for blk in net.layer1)
        plain = common.build_backbone(name, small_images=True)
        assert all(getattr(blk, last).weight.abs().sum() > 0 for blk in plain.layer1)


def test_train_loader_splits_the_global_batch_and_brings_positives():
    ds = common.make_dataset("digits", "x")
    one = common.TrainLoader(
        ds, common.simclr_views(16), 64, common.STATS["digits"], torch.device("cpu"), workers=0
    )
    assert len(one) == len(ds) // 64
    crops, idx, pos = next(iter(one))
    assert [c.shape for c in crops] == [(64, 3, 16, 16)] * 2 and idx.shape == (64,) and pos is None
    labels = np.arange(len(ds)) % 7
    one.set_clusters(labels, 3)
    crops, idx, pos = next(iter(one))
    assert pos.shape == (64 * 3, 3, 16, 16)
    # the positives' indices come from the anchors' clusters
    keys = next(iter(one._batches()))
    anchors, positives = (
        [k for k, kind, _ in keys if kind == 0],
        [k for k, kind, _ in keys if kind == 1],
    )
    assert np.array_equal(labels[np.repeat(anchors, 3)], labels[positives])
    with pytest.raises(common.UserError, match="larger than"):
        common.TrainLoader(
            ds, common.simclr_views(16), 4096, common.STATS["digits"], torch.device("cpu")
        )


def _loader_indices(rank, world):
    ds = common.make_dataset("digits", "x")
    loader = common.TrainLoader(
        ds, common.simclr_views(16), 64, common.STATS["digits"], torch.device("cpu"), workers=0
    )
    return [k for batch in loader._batches() for k, _, _ in batch][:640]


def test_two_processes_see_together_the_single_process_batches():
    ds = common.make_dataset("digits", "x")
    single = common.TrainLoader(
        ds, common.simclr_views(16), 64, common.STATS["digits"], torch.device("cpu"), workers=0
    )
    batches = [[k for k, _, _ in b] for b in single._batches()]
    r0, r1 = spawn(_loader_indices)
    for s in range(10):
        assert r0[s * 32 : (s + 1) * 32] + r1[s * 32 : (s + 1) * 32] == batches[s]


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet50", 2048)])
def test_backbone_shapes(name, dim):
    net = common.build_backbone(name, small_images=True)
    f, h = net(torch.randn(2, 3, 32, 32))
    assert f.shape == (2, dim, 4, 4) and h.shape == (2, dim) and net.dim == dim
    big = common.build_backbone("resnet18", small_images=False)
    assert big(torch.randn(1, 3, 224, 224))[0].shape == (1, 512, 7, 7)


@pytest.mark.parametrize(
    "name,dim", [("resnet18-half", 256), ("resnet18-quarter", 128), ("resnet18-eighth", 64)]
)
def test_narrow_resnet18_is_resnet18_with_fewer_channels(name, dim):
    """Same layers and tensor names as ResNet-18, every stage's channels divided; both stems;
    zero_init_residual as in the full one; a full ResNet-18's weights do not load into it."""
    net, full = common.build_backbone(name), common.build_backbone("resnet18")
    assert list(net.state_dict()) == list(full.state_dict())
    div = 512 // dim
    assert all(
        a.shape[0] * div == b.shape[0]
        for a, b in zip(net.state_dict().values(), full.state_dict().values())
        if a.dim() > 0
    )
    f, h = net(torch.randn(2, 3, 16, 16))
    assert f.shape == (2, dim, 2, 2) and h.shape == (2, dim) and net.dim == dim
    big = common.build_backbone(name, small_images=False)
    assert big(torch.randn(1, 3, 64, 64))[0].shape == (1, dim, 2, 2)
    zero = common.build_backbone(name, zero_init_residual=True)
    assert all(
        blk.bn2.weight.abs().sum() == 0 for layer in (zero.layer1, zero.layer4) for blk in layer
    )
    assert all(blk.bn2.weight.abs().sum() > 0 for blk in net.layer1)
    conv = net.layer2[
        0
    ].conv1.weight  # Kaiming fan-out init, as torchvision's: std sqrt(2 / (C_out * 9))
    assert abs(conv.std().item() / (2 / (conv.shape[0] * 9)) ** 0.5 - 1) < 0.15


def test_narrow_backbone_weights_round_trip(tmp_path):
    net = common.build_backbone("resnet18-eighth")
    torch.save(net.state_dict(), tmp_path / "b.pt")
    again = common.build_backbone("resnet18-eighth", weights=str(tmp_path / "b.pt"))
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values())
    )
    with pytest.raises(common.UserError, match="does not hold resnet18 weights"):
        common.build_backbone("resnet18", weights=str(tmp_path / "b.pt"))
    with pytest.raises(common.UserError, match="unknown backbone 'resnet18-tenth'"):
        common.build_backbone("resnet18-tenth")


def test_backbone_weights_round_trip_and_mismatch(tmp_path):
    net = common.build_backbone("resnet18")
    torch.save(net.state_dict(), tmp_path / "b.pt")
    again = common.build_backbone("resnet18", weights=str(tmp_path / "b.pt"))
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values())
    )
    with pytest.raises(common.UserError, match="does not hold resnet50"):
        common.build_backbone("resnet50", weights=str(tmp_path / "b.pt"))


def test_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(6, 32, generator=g), dim=1)
    truth = torch.arange(600) % 6
    x = centers[truth] + 0.05 * torch.randn(600, 32, generator=g)
    bank = common.MemoryBank(600, 32, torch.device("cpu"))
    bank.update(torch.arange(600), x)
    assert bank.filled.all()
    labels, c = bank.kmeans(6, seed=1)
    assert adjusted_rand_score(truth.numpy(), labels.numpy()) == 1.0
    assert torch.allclose(c.norm(dim=1), torch.ones(6), atol=1e-5)
    labels2, _ = bank.kmeans(6, seed=1)
    assert torch.equal(labels, labels2)  # deterministic for a seed


def test_kmeans_handles_empty_clusters():
    bank = common.MemoryBank(40, 8, torch.device("cpu"))
    bank.update(torch.arange(40), torch.eye(8)[torch.arange(40) % 2])  # only 2 distinct points
    labels, _ = bank.kmeans(5, iters=5)
    assert labels.shape == (40,) and len(labels.unique()) >= 2
    with pytest.raises(common.UserError):
        bank.kmeans(41)


def test_knn_predict_on_separable_data():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    ytr, yte = torch.arange(400) % 4, torch.arange(100) % 4
    xtr = centers[ytr] + torch.randn(400, 16, generator=g)
    xte = centers[yte] + torch.randn(100, 16, generator=g)
    scores = common.MemoryBank.knn_predict(xte, xtr, ytr, 4, k=20, t=0.1)
    assert scores.shape == (100, 4)
    assert (scores.argmax(1) == yte).float().mean() == 1.0
    assert common.knn_top1(xtr, ytr, xte, yte, 4, k=20) == 1.0
    # weighted votes: with k=1 the nearest sample decides
    s1 = common.MemoryBank.knn_predict(xtr[:5], xtr, ytr, 4, k=1)
    assert torch.equal(s1.argmax(1), ytr[:5])


class ToyNet(nn.Module):
    """f = the image itself through an identity 1x1 convolution (channels are features),
    h = its mean."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.conv.weight.data = torch.eye(3)[:, :, None, None]

    def forward(self, x):
        f = self.conv(x)
        return f, f.mean(dim=(2, 3))


def test_grad_cam_lights_up_what_the_target_depends_on():
    x = torch.zeros(1, 3, 16, 16)
    x[:, 0, :8, :8] = 1.0  # feature 0 lives top-left
    x[:, 1, 8:, 8:] = 1.0  # feature 1 lives bottom-right
    net = ToyNet()
    cam0 = common.grad_cam(net, x, 0)[0]
    cam1 = common.grad_cam(net, x, [1])[0]
    assert cam0[:8, :8].mean() > 0.9 and cam0[8:, 8:].max() < 0.1
    assert cam1[8:, 8:].mean() > 0.9 and cam1[:8, :8].max() < 0.1
    mask = torch.tensor([[False, True, False]])
    assert torch.allclose(common.grad_cam(net, x, mask)[0], cam1)
    head = nn.Linear(3, 2, bias=False)
    head.weight.data = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    cam_logit = common.grad_cam(net, x, lambda h: head(h)[:, 1])[0]  # a class logit
    assert torch.allclose(cam_logit, cam1)
    assert common.grad_cam(net, x, 0, out_size=(4, 4)).shape == (1, 4, 4)


def test_extract_features_uses_eval_mode():
    ds = torch.utils.data.Subset(common.make_dataset("digits", "x"), range(40))
    ds.classes = [str(i) for i in range(10)]
    net = common.build_backbone("resnet18")
    net.train()
    before = net.stem[1].running_mean.clone()
    h, y = common.extract_features(
        net, ds, 16, common.STATS["digits"], 32, torch.device("cpu"), batch_size=16, workers=0
    )
    assert h.shape == (40, 512) and y.shape == (40,)
    assert torch.equal(net.stem[1].running_mean, before)  # BatchNorm statistics untouched
    assert net.training  # mode restored


def test_run_here_is_the_scripts_run_and_puts_the_state_back(tmp_path):
    """conftest.run_here, the in-process `run` most end-to-end tests use: the same exit code, stdout
    and stderr as a real process, and nothing of the script's left in this one (the environment,
    argv, working folder, threads, the stop-signal handlers that main_of arms)."""
    import signal

    def state():
        return (
            dict(os.environ),
            list(sys.argv),
            os.getcwd(),
            torch.get_num_threads(),
            dict(common._caught),
            [signal.getsignal(s) for s in common.STOP_SIGNALS],
        )

    argv = ["simclr.py", "--dataset", "folder", "--data-dir", str(tmp_path / "none")]
    before = state()
    here = run_here(argv, env={"CLEANSSL_X": "1"}, check=False)
    assert state() == before
    there = run(argv, check=False)
    assert (here.returncode, here.stdout, here.stderr) == (2, there.stdout, there.stderr)
    assert here.stderr.startswith("error: ") and len(here.stderr.splitlines()) == 1
