"""Multi-crop (Caron et al. 2020, Sec. 3.2): the views, the loader's crops, and the batching
of crops by size in SwAV's forward (one backbone pass per crop size)."""

import numpy as np
import pytest
import torch

import common
import swav

SMALL = ["--prototypes", "30", "--proj-hidden", "64", "--proj-dim", "32"]


def test_views_are_two_global_and_n_local_crops():
    for size, local in ((224, 96), (96, 48), (32, 16)):
        views = common.multicrop_views(size, 6)
        assert [v.size for v in views] == [size] * 2 + [local] * 6
        assert {v.scale for v in views[:2]} == {(0.14, 1.0)} and {v.scale for v in views[2:]} == {
            (0.05, 0.14)
        }
    assert len(common.multicrop_views(32, 0)) == 2


def test_swav_views_are_the_recipes():
    # CIFAR defaults: solo-learn's symmetric.yaml, 2 crops of 32 px, no local crops
    views = swav.swav_views(32, swav.parse_args([]))
    assert [v.size for v in views] == [32, 32] and all(v.scale == (0.08, 1.0) for v in views)
    assert all(
        v.blur_p == 0.5 and v.solarize_p == 0 and v.jitter == (0.8, 0.8, 0.8, 0.2) for v in views
    )
    # the docstring's ImageNet command: 2x224 + 6x96 (swav_800ep_pretrain.sh)
    args = swav.parse_args(
        ["--local-crops", "6", "--global-scale", "0.14", "1", "--local-scale", "0.05", "0.14"]
    )
    views = swav.swav_views(224, args)
    assert [v.size for v in views] == [224] * 2 + [96] * 6
    assert {v.scale for v in views[:2]} == {(0.14, 1.0)} and {v.scale for v in views[2:]} == {
        (0.05, 0.14)
    }
    assert all(v.blur_p == 0.5 for v in views)


@pytest.mark.parametrize("data_path", ["cpu", "tensor"])
def test_loader_yields_one_tensor_per_crop_and_positives_at_the_global_size(data_path):
    ds = common.make_dataset("digits", "x")
    loader = common.TrainLoader(
        ds,
        common.multicrop_views(16, 3),
        8,
        common.STATS["digits"],
        torch.device("cpu"),
        workers=0,
        positive=common.positive_view(16),
        data_path=data_path,
    )
    loader.set_clusters(np.arange(len(ds)) % 5, 2)
    crops, idx, pos = next(iter(loader))
    assert [tuple(c.shape) for c in crops] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 3
    assert pos.shape == (16, 3, 16, 16) and idx.shape == (8,)
    assert not torch.allclose(crops[2], crops[3])  # each local crop is drawn on its own


def model_and_calls():
    torch.manual_seed(0)
    model = swav.SwAV(
        swav.parse_args(SMALL + ["--xattn", "--xattn-clusters", "4"]), small_images=True
    ).eval()
    calls = []
    model.backbone.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape)))
    return model, calls


@torch.no_grad()
def test_forward_runs_one_backbone_pass_per_crop_size():
    model, calls = model_and_calls()
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(4, 3, 8, 8, generator=g) for _ in range(3)
    ]
    out = model(crops)
    assert calls == [
        (8, 3, 16, 16),
        (12, 3, 8, 8),
    ]  # 2 passes for 5 crops: the globals, then the locals
    assert (
        out["h"].shape == (8, 512)
        and out["z"].shape == (20, 32)
        and out["scores"].shape == (20, 30)
    )
    # in crop order, and (BN in eval mode) what each crop gives alone
    for v, c in enumerate(crops):
        alone = model.backbone(c)[1]
        z = torch.nn.functional.normalize(model.projector(alone), dim=1)
        assert torch.allclose(out["z"][v * 4 : (v + 1) * 4], z, atol=1e-5), v
        if v < 2:
            assert torch.allclose(out["h"][v * 4 : (v + 1) * 4], alone, atol=1e-5)
    assert torch.allclose(out["z"].norm(dim=1), torch.ones(20), atol=1e-5)
    calls.clear()
    model(crops[:2])  # no local crops: a single pass
    assert calls == [(8, 3, 16, 16)]


@torch.no_grad()
def test_multicrop_pass_runs_each_run_of_one_size_once_and_keeps_crop_order():
    backbone = common.build_backbone("resnet18-eighth").eval()
    calls = []
    backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    g = torch.Generator().manual_seed(2)
    big, small = (torch.randn(3, 3, s, s, generator=g) for s in (16, 8))
    extra = torch.randn(5, 3, 16, 16, generator=g)
    # sizes 16, 8, 16: three runs (a size that comes back starts a new run)
    h, f = common.multicrop_pass(backbone, [big, small, big], extra)
    assert calls == [(3 + 5, 3, 16, 16), (3, 3, 8, 8), (3, 3, 16, 16)]
    calls.clear()
    want = torch.cat([backbone(c)[1] for c in (big, small, big)])
    assert h.shape == (9, 64) and torch.allclose(h, want, atol=1e-5)  # the extra rows not in h
    # f: the first crop's feature maps, then the extra's
    assert f.shape == (3 + 5, 64, 2, 2)
    assert torch.allclose(f[:3], backbone(big)[0], atol=1e-5)
    assert torch.allclose(f[3:], backbone(extra)[0], atol=1e-5)
    calls.clear()
    h2, f2 = common.multicrop_pass(backbone, [big, big, small, small])
    assert calls == [(6, 3, 16, 16), (6, 3, 8, 8)] and h2.shape == (12, 64) and f2 is None


@torch.no_grad()
def test_positives_ride_with_the_global_crops_and_get_no_codes():
    model, calls = model_and_calls()
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)
    ]
    pos = torch.randn(4 * 2, 3, 16, 16, generator=g)  # P = 2 positives per image
    out = model(crops, pos)
    assert calls == [(8 + 8, 3, 16, 16), (8, 3, 8, 8)]
    assert out["scores"].shape == (16, 30)  # the positives are not predicted
    assert out["f"].shape == (4 + 8, 512, 2, 2) and out["logits"].shape == (12, 4)
    assert torch.allclose(
        out["f"][:4], model.backbone(crops[0])[0], atol=1e-5
    )  # anchors: the first global crop
    assert torch.allclose(out["f"][4:], model.backbone(pos)[0], atol=1e-5)
