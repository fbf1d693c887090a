"""byol.py: the loss against the paper's equation, the EMA target, DDP equivalence and
consistency across processes, end-to-end runs, resume, bad input."""

import os

import pytest
import torch
import torch.nn as nn

import byol
import common
from conftest import BACKBONE, TINY, read_metrics, run, run_here, spawn, torchrun

SMALL = [
    "--proj-hidden",
    "64",
    "--pred-hidden",
    "64",
    "--proj-dim",
    "32",
]  # narrow heads: fast unit tests


def _model(seed=0):
    torch.manual_seed(seed)
    return byol.BYOL(byol.parse_args(SMALL), small_images=True)


def _crops(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)]


def _loss(out, b):
    return byol.regression_loss(
        out["p"][:b], out["p"][b:], out["z_target"][:b], out["z_target"][b:]
    )


def _slow_regression_loss(p1, p2, z1, z2):
    """Eq. (2) of Grill et al., one image at a time: ||p/||p|| - z'/||z'|| ||^2, each view
    predicting the other's target, summed over the two directions, averaged over images."""
    total = 0.0
    for i in range(p1.shape[0]):
        for p, z in ((p1[i], z2[i]), (p2[i], z1[i])):
            pn = p / torch.sqrt((p * p).sum())
            zn = z / torch.sqrt((z * z).sum())
            total = total + ((pn - zn) ** 2).sum()
    return total / p1.shape[0]


def test_regression_loss_matches_the_paper_equation_and_stops_target_gradient():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(6, 8, generator=g, dtype=torch.float64) for _ in range(4))
    for t in (p1, z1, z2):
        t.requires_grad_(True)
    got = byol.regression_loss(p1, p2, z1, z2)
    assert torch.allclose(got.double(), _slow_regression_loss(p1, p2, z1, z2), atol=1e-6)
    got.backward()
    assert (
        p1.grad is not None and z1.grad is None and z2.grad is None
    )  # the target is a regression target, not a parameter
    # 2 - 2 cos: 0 when each prediction points at the other view's target, 8 when opposite
    # (two terms)
    assert byol.regression_loss(3 * z2, 0.5 * z1, z1, z2).abs().item() < 1e-6
    assert abs(byol.regression_loss(-z2, -z1, z1, z2).item() - 8.0) < 1e-5


def test_ema_update_and_tau_schedule_by_hand():
    torch.manual_seed(0)
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in target.parameters()]
    byol.ema_update(target, online, 0.9)
    for before, o, t in zip(t0, online.parameters(), target.parameters()):
        assert torch.allclose(t, 0.9 * before + 0.1 * o.detach())
    # BYOL Sec. 3.2: tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2
    assert byol.tau_at(0, 100, 0.99) == pytest.approx(0.99)
    assert byol.tau_at(50, 100, 0.99) == pytest.approx(0.995)
    assert byol.tau_at(100, 100, 0.99) == pytest.approx(1.0)
    assert byol.tau_at(25, 100, 0.99) == pytest.approx(1 - 0.01 * (0.5**0.5 + 1) / 2)
    assert byol.tau_at(0, 100, 0.9, 0.95) == pytest.approx(0.9) and byol.tau_at(
        100, 100, 0.9, 0.95
    ) == pytest.approx(0.95)


def test_target_gets_no_gradient_and_keeps_no_buffers():
    model = _model()
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.backbone.parameters(), model.target_backbone.parameters())
    )
    out = model(_crops(4, 1))
    assert out["z_target"].requires_grad is False
    _loss(out, 4).backward()
    targets = list(model.target_backbone.parameters()) + list(model.target_projector.parameters())
    assert all(p.grad is None and not p.requires_grad for p in targets)
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert not any(
        n.startswith("target_") for n, _ in model.named_buffers()
    )  # batch statistics only
    trained = {id(p) for g in common.param_groups(model) for p in g["params"]}  # what LARS moves
    assert {id(p) for p in model.predictor.parameters()} <= trained and not {
        id(p) for p in targets
    } & trained


def _imagenet_args():
    import test_recipes

    return byol.parse_args(test_recipes.imagenet_argv(byol, "byol.py", []))


def test_recipe_flags_reach_the_views_the_backbone_and_lars():
    """The defaults (solo-learn CIFAR) and the docstring's ImageNet command (official BYOL)
    are not only parsed: they build the views, the backbone and the optimizer's groups."""
    cifar, imagenet = byol.parse_args([]), _imagenet_args()
    v1, v2 = byol.train_views(cifar, 32)
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (
        0.0,
        0.0,
        0.0,
        0.2,
    )  # asymmetric.yaml
    assert (
        v1.scale == v2.scale == (0.08, 1.0)
        and v1.jitter == (0.4, 0.4, 0.2, 0.1)
        and v1.jitter_p == 0.8
    )
    v1, v2 = byol.train_views(imagenet, 224)
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (
        1.0,
        0.1,
        0.0,
        0.2,
    )  # Grill et al., Table 6
    assert (cifar.lars_mode, cifar.lars_eta, imagenet.lars_mode, imagenet.lars_eta) == (
        "clip",
        0.02,
        "official",
        0.001,
    )
    assert cifar.sync_bn and imagenet.sync_bn and not byol.parse_args(["--no-sync-bn"]).sync_bn
    model = byol.BYOL(byol.parse_args(SMALL + ["--zero-init-residual"]), small_images=True)
    last_bn = [m.bn2.weight for m in model.backbone.modules() if hasattr(m, "bn2")]
    assert last_bn and all(torch.all(w == 0) for w in last_bn)  # each block starts as the identity
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.backbone.parameters(), model.target_backbone.parameters())
    )
    assert not any(
        torch.all(m.bn2.weight == 0) for m in _model().backbone.modules() if hasattr(m, "bn2")
    )
    opt = common.LARS(
        common.param_groups(model),
        lr=0.1,
        weight_decay=cifar.weight_decay,
        eta=cifar.lars_eta,
        mode=cifar.lars_mode,
    )
    lars, plain = opt.param_groups
    assert lars["lars"] and lars["mode"] == "clip" and lars["weight_decay"] == 1e-5
    assert (
        not plain["lars"]
        and plain["weight_decay"] == 0.0
        and all(p.ndim == 1 for p in plain["params"])
    )


def test_loss_scale_reaches_the_loss_and_moves_only_the_plain_sgd_parameters(tmp_path):
    """--loss-scale multiplies L_BYOL in the training step; under official LARS without weight
    decay the LARS weights then step exactly as before and the biases and norms scale times as far
    (the help's claim, and what parts byol.py's step from lightly's quarter-sized loss)."""
    flags = TINY + SMALL + ["--epochs", "1", "--steps-per-epoch", "1", "--knn-every", "0"]
    for scale in ("1", "0.25"):
        assert (
            byol.main(
                byol.parse_args(flags + ["--loss-scale", scale, "--run-dir", str(tmp_path / scale)])
            )
            == 0
        )
    one, quarter = (read_metrics(tmp_path / s)[0]["loss_ssl"] for s in ("1", "0.25"))
    assert quarter == pytest.approx(
        0.25 * one, rel=1e-5
    )  # the same first batch and weights, a quarter of the loss
    crops = _crops(8, 0)
    steps = []
    for scale in (1.0, 0.25):
        model = _model()
        opt = common.LARS(common.param_groups(model), lr=0.5, weight_decay=0.0, mode="official")
        (scale * _loss(model(crops), 8)).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        steps.append(
            {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}
        )
    for n, d in steps[0].items():
        if d.ndim > 1:
            torch.testing.assert_close(steps[1][n], d, rtol=1e-4, atol=1e-7)
        else:
            torch.testing.assert_close(steps[1][n], 0.25 * d, rtol=1e-4, atol=1e-7)
    with pytest.raises(common.UserError, match="--loss-scale must be positive"):
        common.check_run(byol.parse_args(["--loss-scale", "0"]), byol.METHOD, byol.check_args)


def _no_bn(module):
    """Batch statistics tie every output to the per-process batch; without BatchNorm, the
    model's rows are independent and 2 processes must reproduce 1 process exactly."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            _no_bn(child)
    return module


def _train_step(model, net, crops, tau=0.99):
    """One BYOL step as main() does it: forward through `net` (the DDP wrapper or the
    model), loss, backward, LARS, then the EMA of the target."""
    opt = common.LARS(common.param_groups(model), lr=0.5, weight_decay=1e-5)
    b = crops[0].shape[0]
    loss = _loss(net(crops), b)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    byol.ema_update(model.target_backbone, model.backbone, tau)
    byol.ema_update(model.target_projector, model.projector, tau)
    return loss.item(), grads, {k: v.clone() for k, v in model.state_dict().items()}


def _ddp_equivalence(rank, world, emb, crops):
    # the loss on given embeddings, each process holding its rows
    b = emb[0].shape[0] // world
    mine = [e[rank * b : (rank + 1) * b].clone().requires_grad_(True) for e in emb]
    loss_emb = byol.regression_loss(*mine)
    loss_emb.backward()
    emb_grads = [m.grad for m in mine[:2]]
    # one whole training step through DDP
    model = _no_bn(_model())
    net = nn.parallel.DistributedDataParallel(model)
    step = _train_step(model, net, [c[rank * b : (rank + 1) * b] for c in crops])
    return loss_emb.item(), emb_grads, step


def test_ddp_two_processes_equal_one_process_on_the_global_batch():
    """regression_loss returns the mean over a process's b of the W*b images, and images do
    not interact, so the single-process loss is the mean of the W local losses and its
    gradient w.r.t. rows held by rank r is (1/W) * rank r's local gradient. DDP averages
    parameter gradients over processes, so the averaged gradient (and the LARS step and the
    EMA that follow) equal one process on the whole batch."""
    n, world = 8, 2
    g = torch.Generator().manual_seed(3)
    emb = [torch.randn(n, 16, generator=g) for _ in range(4)]
    crops = _crops(n, 4)
    results = spawn(_ddp_equivalence, emb, crops, world=world)
    # the loss on embeddings
    single = [e.clone().requires_grad_(True) for e in emb]
    loss = byol.regression_loss(*single)
    loss.backward()
    assert sum(r[0] for r in results) / world == pytest.approx(loss.item(), abs=1e-6)
    b = n // world
    for r, res in enumerate(results):
        for v in range(2):
            assert torch.allclose(single[v].grad[r * b : (r + 1) * b], res[1][v] / world, atol=1e-7)
    # the whole step
    model = _no_bn(_model())
    s_loss, s_grads, s_state = _train_step(model, model, crops)
    assert sum(r[2][0] for r in results) / world == pytest.approx(s_loss, rel=1e-5)
    for res in results:
        _, grads, state = res[2]
        assert grads.keys() == s_grads.keys() and not any(k.startswith("target_") for k in grads)
        for k in s_grads:
            assert torch.allclose(grads[k], s_grads[k], rtol=1e-4, atol=1e-6), k
        for k in s_state:
            assert torch.allclose(state[k], s_state[k], rtol=1e-4, atol=1e-6), k
    t0 = _no_bn(_model()).state_dict()
    assert not torch.equal(
        s_state["target_projector.0.weight"], t0["target_projector.0.weight"]
    )  # the EMA moved it


def _two_steps_real_batchnorm(rank, world):
    model = _model()
    net = nn.parallel.DistributedDataParallel(model)
    for s in range(2):
        _train_step(model, net, _crops(4, 10 * s + rank))  # each process its own images
    return {k: v for k, v in model.state_dict().items() if k.startswith("target_")}, [
        p.detach().clone() for p in model.parameters() if p.requires_grad
    ]


def test_target_is_the_same_on_every_process_after_each_step():
    (t0, o0), (t1, o1) = spawn(_two_steps_real_batchnorm)
    assert t0.keys() == t1.keys() and len(t0) > 0
    assert all(torch.equal(t0[k], t1[k]) for k in t0)
    assert all(torch.equal(a, b) for a, b in zip(o0, o1))
    fresh = _model().state_dict()
    assert not all(torch.equal(t0[k], fresh[k]) for k in t0)  # it did train


def test_end_to_end_digits_and_resume_matches_an_unbroken_run(tmp_path):
    flags = TINY + ["--epochs", "2", "--knn-every", "2"]
    run_here(["byol.py"] + flags + ["--run-dir", str(tmp_path / "full")])
    rows = read_metrics(tmp_path / "full")
    assert [r["epoch"] for r in rows] == [1, 2] and "knn_top1" in rows[-1]
    for key in (
        "loss",
        "loss_ssl",
        "lr",
        "tau",
        "qscore",
        "collapse_std",
        "images_per_s",
        "peak_mem_gb",
        "seconds",
    ):
        assert all(key in r and r[key] == r[key] for r in rows), key
    assert (
        0 < rows[-1]["collapse_std"]
        and 0 <= rows[-1]["loss"] <= 8
        and rows[0]["tau"] < rows[1]["tau"]
    )
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    assert full["method"] == "byol" and full["epoch"] == 2 and full["momentum_step"] == 6
    assert any(k.startswith("target_backbone.") for k in full["model"])
    common.build_backbone(BACKBONE, weights=str(tmp_path / "full" / "backbone.pt"))
    # a run killed right after its first checkpoint, then resumed, ends with the same weights
    kill = (
        "import sys, byol, common\norig, n = common.save_atomic, [0]\n"
        "def save(obj, path):\n    orig(obj, path)\n    n[0] += 1\n"
        "    if n[0] == 2: raise KeyboardInterrupt  # checkpoint.pt and backbone.pt of epoch 1 "
        "are written\n"
        "common.save_atomic = save\nbyol.main(byol.parse_args(sys.argv[1:]))\n"
    )
    broken = run(["-c", kill] + flags + ["--run-dir", str(tmp_path / "cut")], check=False)
    assert broken.returncode != 0 and len(read_metrics(tmp_path / "cut")) == 1
    run_here(["byol.py"] + flags + ["--resume", str(tmp_path / "cut")])
    resumed = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["momentum_step"] == full["momentum_step"]
    assert full["model"].keys() == resumed["model"].keys()
    for k in full["model"]:  # online, predictor and target
        assert torch.equal(full["model"][k], resumed["model"][k]), k
    for a, b in zip(full["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["momentum"], b["momentum"])
    # another --steps-per-epoch would make the tau schedule jump: refused, as every flag that
    # changes the run
    with pytest.raises(
        common.UserError,
        match="was run with --epochs 2 --steps-per-epoch 3, not --epochs 3 --steps-per-epoch 2",
    ):
        byol.main(
            byol.parse_args(
                flags
                + ["--epochs", "3", "--steps-per-epoch", "2", "--resume", str(tmp_path / "cut")]
            )
        )
    # and a checkpoint whose momentum step is not its epochs' steps (a data set that changed
    # size), by the target's check
    resumed["momentum_step"] = 5
    os.makedirs(tmp_path / "odd")
    torch.save(resumed, tmp_path / "odd" / "checkpoint.pt")
    with pytest.raises(common.UserError, match="momentum step 5, not 6"):
        byol.main(byol.parse_args(flags + ["--resume", str(tmp_path / "odd")]))


def test_end_to_end_with_both_add_ons(tmp_path):
    run_here(
        ["byol.py"]
        + TINY
        + [
            "--epochs",
            "1",
            "--knn-every",
            "0",
            "--qscore-lambda",
            "0.1",
            "--xattn",
            "--xattn-clusters",
            "10",
            "--run-dir",
            str(tmp_path / "r"),
        ]
    )
    row = read_metrics(tmp_path / "r")[0]
    assert row["loss_qscore"] <= 0 and row["loss_mask"] > 0 and row["loss_cls"] > 0
    assert row["loss"] == pytest.approx(
        row["loss_ssl"] + row["loss_qscore"] + 0.05 * row["loss_mask"] + 0.1 * row["loss_cls"],
        rel=1e-4,
    )
    assert any(
        k.startswith("xattn.")
        for k in torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)["model"]
    )
    assert not any(
        "xattn" in k for k in torch.load(tmp_path / "r" / "backbone.pt", weights_only=True)
    )


def test_torchrun_two_processes(tmp_path):
    p = torchrun(
        "byol.py", TINY + ["--epochs", "1", "--knn-every", "0", "--run-dir", str(tmp_path / "r")]
    )
    assert "2 process(es)" in p.stdout
    # --sync-bn is on by default (the recipes use global BN); gloo has no SyncBatchNorm: one
    # note, and the run goes on
    assert p.stdout.count("each process normalizes its own share of the batch") == 1
    row = read_metrics(tmp_path / "r")[0]
    assert row["epoch"] == 1 and 0 <= row["loss"] <= 8
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)["momentum_step"] == 3


def test_bad_input_and_non_finite_loss(tmp_path):
    p = run(["byol.py", "--dataset", "folder", "--data-dir", str(tmp_path / "none")], check=False)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "Traceback" not in p.stderr
    torch.save({"method": "simclr", "args": {"backbone": "resnet18"}}, tmp_path / "checkpoint.pt")
    with pytest.raises(common.UserError, match="simclr checkpoint, not byol"):
        common.check_run(byol.parse_args(["--resume", str(tmp_path)]), byol.METHOD, byol.check_args)
    d = tmp_path / "nan"
    assert (
        byol.main(
            byol.parse_args(
                TINY
                + SMALL
                + ["--epochs", "2", "--lr", "1e38", "--warmup-epochs", "0", "--run-dir", str(d)]
            )
        )
        == 1
    )
    assert not (d / "checkpoint.pt").exists()  # nothing is written once the loss went bad
