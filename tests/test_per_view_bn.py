"""--per-view-bn: each view goes through the network on its own, so BatchNorm statistics are
per view (solo-learn's recipe, and the official code of every two-view method but SimCLR);
--no-per-view-bn puts the views in one batch. Checked on the pooled features h of every two-view
script in train mode."""

import pytest
import torch

import byol
import moco
import simclr
import simsiam

MODELS = {
    "simclr": (simclr, simclr.SimCLR),
    "moco": (moco, moco.MoCo),
    "byol": (byol, byol.BYOL),
    "simsiam": (simsiam, simsiam.SimSiam),
}


@pytest.mark.parametrize("name", MODELS)
def test_views_get_their_own_batch_statistics_unless_asked_otherwise(name):
    mod, cls = MODELS[name]
    assert mod.parse_args([]).per_view_bn  # the CIFAR recipe's default
    g = torch.Generator().manual_seed(0)
    crops = [
        torch.randn(4, 3, 16, 16, generator=g),
        3 + 2 * torch.randn(4, 3, 16, 16, generator=g),
    ]  # unlike views
    for per_view in (True, False):
        torch.manual_seed(0)
        model = cls(
            mod.parse_args(
                [
                    "--per-view-bn" if per_view else "--no-per-view-bn",
                    "--proj-hidden",
                    "32",
                    "--proj-dim",
                    "16",
                ]
            ),
            True,
        ).train()
        with torch.no_grad():
            out = model(crops)
            h, z = out["h"], out.get("z", out.get("q"))  # (8, 512), (8, 16)
            apart = torch.cat([model.backbone(c)[1] for c in crops])
            together = model.backbone(torch.cat(crops))[1]
            z_apart = torch.cat(
                [model.projector(a) for a in apart.split(4)]
            )  # the heads see one view at a time too
            if name == "moco" and model.predictor is not None:
                z_apart = torch.cat([model.predictor(a) for a in z_apart.split(4)])
        assert h.shape == (8, model.backbone.dim)
        want, other = (apart, together) if per_view else (together, apart)
        assert torch.allclose(h, want, atol=1e-5) and not torch.allclose(h, other, atol=1e-3), (
            name,
            per_view,
        )
        assert torch.allclose(z, z_apart, atol=1e-5) == per_view, (name, per_view)


def test_byol_target_sees_the_views_apart_too():
    torch.manual_seed(0)
    model = byol.BYOL(
        byol.parse_args(["--proj-hidden", "32", "--proj-dim", "16", "--pred-hidden", "32"]), True
    ).train()
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, 16, 16, generator=g), 3 + 2 * torch.randn(4, 3, 16, 16, generator=g)]
    with torch.no_grad():
        zt = model(crops)["z_target"]
        apart = torch.cat([model.target_projector(model.target_backbone(c)[1]) for c in crops])
    assert torch.allclose(zt, apart, atol=1e-5)
