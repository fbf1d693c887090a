"""simsiam.py: the loss against Eq. (1)-(4) of Chen & He, the stop-gradient, the fixed
predictor LR, DDP against one process, and the script end to end (plain, both add-ons,
torchrun, resume after a kill, bad input, a non-finite loss)."""

import math
import os

import pytest
import torch
import torch.nn as nn

import simsiam
from conftest import (
    BACKBONE,
    TINY,
    kill_after_first_checkpoint,
    online_knn_of,
    read_metrics,
    run,
    run_here,
    spawn,
    torchrun,
)

SMALL = ["--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "16"]


def slow_loss(p1, p2, z1, z2, stop_gradient=True):
    """Eq. (1) and (4) written out image by image: D(p, z) = -p/||p|| . z/||z||,
    L = 1/2 D(p1, stopgrad(z2)) + 1/2 D(p2, stopgrad(z1)), averaged over the batch."""
    if stop_gradient:
        z1, z2 = z1.detach(), z2.detach()
    total = 0.0
    for i in range(p1.shape[0]):
        d12 = -torch.dot(p1[i], z2[i]) / (p1[i].norm() * z2[i].norm())
        d21 = -torch.dot(p2[i], z1[i]) / (p2[i].norm() * z1[i].norm())
        total = total + 0.5 * d12 + 0.5 * d21
    return total / p1.shape[0]


def test_negative_cosine_loss_matches_the_equations():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(6, 10, generator=g) for _ in range(4))
    assert torch.allclose(
        simsiam.negative_cosine_loss(p1, p2, z1, z2), slow_loss(p1, p2, z1, z2), atol=1e-6
    )
    # predictions that point where the other view's projection points: the minimum, -1, at any scale
    assert math.isclose(
        simsiam.negative_cosine_loss(3 * z2, z1 / 7, z1, z2).item(), -1.0, abs_tol=1e-6
    )
    assert math.isclose(simsiam.negative_cosine_loss(-z2, -z1, z1, z2).item(), 1.0, abs_tol=1e-6)
    # symmetrized: swapping the views changes nothing; swapping only p's pairing does
    assert torch.allclose(
        simsiam.negative_cosine_loss(p2, p1, z2, z1), simsiam.negative_cosine_loss(p1, p2, z1, z2)
    )
    assert not torch.allclose(
        simsiam.negative_cosine_loss(p1, p2, z2, z1), simsiam.negative_cosine_loss(p1, p2, z1, z2)
    )


def test_stop_gradient_holds():
    """The target branch (z) gets no gradient from the loss; in the model, z still learns,
    but only through the predictor's input, exactly as if the targets were constants."""
    g = torch.Generator().manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(4, 8, generator=g).requires_grad_() for _ in range(4))
    simsiam.negative_cosine_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0

    torch.manual_seed(0)
    model = simsiam.SimSiam(simsiam.parse_args(SMALL), small_images=True)
    x1, x2 = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(target_fn, stop_gradient=True):
        out = model([x1, x2])
        z1, z2 = target_fn(out)
        return torch.autograd.grad(
            slow_loss(out["p"][:6], out["p"][6:], z1, z2, stop_gradient), params
        )

    with (
        torch.no_grad()
    ):  # train-mode BN on the same input gives the same z: constants of equal value
        const = model([x1, x2])["z"]
    ours = grads(lambda o: (o["z"][:6], o["z"][6:]))
    with_constants = grads(lambda o: (const[:6], const[6:]))
    without_sg = grads(lambda o: (o["z"][:6], o["z"][6:]), stop_gradient=False)
    for a, b in zip(ours, with_constants):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(
        not torch.allclose(a, c, atol=1e-6) for a, c in zip(ours, without_sg)
    )  # the test can fail


def _ddp_loss(rank, world, p1, p2, z1, z2):
    b = p1.shape[0] // world
    mine = [t[rank * b : (rank + 1) * b].clone().requires_grad_() for t in (p1, p2)]
    loss = simsiam.negative_cosine_loss(
        mine[0], mine[1], z1[rank * b : (rank + 1) * b], z2[rank * b : (rank + 1) * b]
    )
    loss.backward()
    return loss.item(), mine[0].grad, mine[1].grad


def test_loss_two_processes_equal_one_process():
    """Each process returns the mean over its own b images and DDP averages over processes:
    so the mean of the 2 losses is the global loss, and grad_r / world is the global loss's
    gradient w.r.t. rank r's rows (no image's term touches another image's rows)."""
    g = torch.Generator().manual_seed(2)
    p1, p2, z1, z2 = (torch.randn(8, 5, generator=g) for _ in range(4))
    full1, full2 = p1.clone().requires_grad_(), p2.clone().requires_grad_()
    loss = simsiam.negative_cosine_loss(full1, full2, z1, z2)
    loss.backward()
    results = spawn(_ddp_loss, p1, p2, z1, z2)
    assert math.isclose(sum(r[0] for r in results) / 2, loss.item(), rel_tol=1e-6)
    assert torch.allclose(torch.cat([r[1] for r in results]) / 2, full1.grad, atol=1e-7)
    assert torch.allclose(torch.cat([r[2] for r in results]) / 2, full2.grad, atol=1e-7)


def _one_step(model, crops, args, ddp=None):
    b = crops[0].shape[0]
    out = (ddp or model)(crops)
    loss = simsiam.negative_cosine_loss(out["p"][:b], out["p"][b:], out["z"][:b], out["z"][b:])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(
        simsiam.param_groups(model, args.weight_decay, True), lr=0.5, momentum=0.9
    )
    opt.step()
    return loss.item(), grads, {k: v.clone() for k, v in model.state_dict().items()}


def _ddp_step(rank, world, state, x1, x2):
    args = simsiam.parse_args(SMALL)
    model = simsiam.SimSiam(args, small_images=True)
    model.load_state_dict(state)
    model.eval()  # BN on running statistics: each image's output depends on itself only
    ddp = nn.parallel.DistributedDataParallel(model)
    b = x1.shape[0] // world
    return _one_step(
        model, [x1[rank * b : (rank + 1) * b], x2[rank * b : (rank + 1) * b]], args, ddp
    )


def test_ddp_step_two_processes_equal_one_process():
    """The whole model, DDP-wrapped and called once, in 2 gloo processes on halves of the
    batch: the mean of the losses, the (DDP-averaged) gradients and the weights after one
    SGD step equal one process on the whole batch, and both processes hold the same weights."""
    args = simsiam.parse_args(SMALL)
    torch.manual_seed(0)
    model = simsiam.SimSiam(args, small_images=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 3, 8, 8, generator=g)
    model.eval()
    loss, grads, after = _one_step(model, [x1, x2], args)
    results = spawn(_ddp_step, state, x1, x2)
    assert math.isclose(sum(r[0] for r in results) / 2, loss, rel_tol=1e-5)
    for r in results:
        for n in grads:
            assert torch.allclose(r[1][n], grads[n], atol=1e-6, rtol=1e-4), n
        for k in after:
            assert torch.allclose(r[2][k].float(), after[k].float(), atol=1e-6), k
    for k in after:
        assert torch.equal(results[0][2][k], results[1][2][k]), k


def test_param_groups_fix_the_predictor_and_decay_every_weight():
    """Official SimSiam and solo-learn's SGD decay every weight, biases and norms included."""
    args = simsiam.parse_args(SMALL + ["--xattn", "--xattn-clusters", "4"])
    model = simsiam.SimSiam(args, small_images=True)
    groups = simsiam.param_groups(model, 5e-4, fix_pred_lr=True)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    fixed = {id(p) for g in groups if g["fix_lr"] for p in g["params"]}
    assert fixed == {id(p) for p in model.predictor.parameters()}
    assert all(g["weight_decay"] == 5e-4 for g in groups)
    assert any(
        p.ndim == 1 for g in groups for p in g["params"]
    )  # biases and BN weights are among them
    assert not any(g["fix_lr"] for g in simsiam.param_groups(model, 5e-4, fix_pred_lr=False))
    assert (
        simsiam.parse_args([]).fix_pred_lr
        and not simsiam.parse_args(["--no-fix-pred-lr"]).fix_pred_lr
    )


def _imagenet_args():
    import test_recipes

    return simsiam.parse_args(test_recipes.imagenet_argv(simsiam, "simsiam.py", []))


def test_recipe_flags_reach_the_views_and_the_model():
    """The defaults (solo-learn CIFAR) and the docstring's ImageNet command (official SimSiam)
    build the views, the backbone's initialization and the projector."""
    cifar, imagenet = simsiam.parse_args([]), _imagenet_args()
    v1, v2 = simsiam.train_views(cifar, 32)
    assert (
        v1 == v2 and v1.scale == (0.08, 1.0) and v1.blur_p == 0.5 and v1.gray_p == 0.2
    )  # symmetric_weak.yaml
    assert v1.jitter == pytest.approx((0.4, 0.4, 0.4, 0.1)) and v1.jitter_p == 0.8
    v1, _ = simsiam.train_views(imagenet, 224)
    assert (
        v1.scale == (0.2, 1.0)
        and v1.blur_p == 0.5
        and v1.jitter == pytest.approx((0.4, 0.4, 0.4, 0.1))
    )
    assert (
        imagenet.zero_init_residual
        and not cifar.zero_init_residual
        and cifar.sync_bn
        and imagenet.sync_bn
    )
    model = simsiam.SimSiam(simsiam.parse_args(SMALL + ["--zero-init-residual"]), small_images=True)
    last_bn = [m.bn2.weight for m in model.backbone.modules() if hasattr(m, "bn2")]
    assert last_bn and all(torch.all(w == 0) for w in last_bn)
    linears = lambda net: [m for m in net if isinstance(m, nn.Linear)]
    assert len(linears(model.projector)) == 3 and isinstance(model.projector[-1], nn.BatchNorm1d)
    two = simsiam.SimSiam(
        simsiam.parse_args(SMALL + ["--proj-layers", "2"]), small_images=True
    )  # paper App. D
    assert [(m.in_features, m.out_features) for m in linears(two.projector)] == [
        (512, 64),
        (64, 32),
    ]
    assert two([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)])["z"].shape == (8, 32)


def test_model_outputs_and_add_on_rows():
    args = simsiam.parse_args(SMALL + ["--xattn", "--xattn-clusters", "4"])
    torch.manual_seed(0)
    model = simsiam.SimSiam(args, small_images=True)
    x1, x2, pos = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(8, 3, 16, 16)
    out = model([x1, x2])
    assert out["z"].shape == (8, 32) and out["p"].shape == (8, 32) and out["h"].shape == (8, 512)
    assert "f" not in out  # no positives: no add-on work
    out = model([x1, x2], pos)
    assert out["f"].shape[0] == 4 + 8 and out["logits"].shape == (12, 4)


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        simsiam.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--fix-pred-lr",
        "--pred-hidden",
        "--qscore-lambda",
        "--xattn-positives",
        "--resume",
        "--sync-bn",
        "--no-sync-bn",
        "--proj-layers",
        "--jitter-strength",
        "--blur-prob",
        "--zero-init-residual",
    ):
        assert flag in text


# --- the script end to end ----------------------------------------------------------------
RUN = TINY + [
    "--epochs",
    "2",
    "--lr",
    "3",
    "--warmup-epochs",
    "0",
    "--knn-every",
    "2",
]  # no warm-up: 2 epochs of cosine


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One unbroken 2-epoch run, shared by the output test and the resume test."""
    d = tmp_path_factory.mktemp("simsiam") / "straight"
    p = run_here(["simsiam.py"] + RUN + ["--run-dir", str(d)])
    return d, p


def test_script_trains_and_writes_the_run(straight):
    d, p = straight
    assert "img/s" in p.stdout and "online-knn" in p.stdout
    m = read_metrics(d)
    assert [r["epoch"] for r in m] == [1, 2]
    assert m[1]["loss"] < m[0]["loss"]
    for k in (
        "loss_ssl",
        "lr",
        "qscore",
        "qscore_active",
        "qscore_under_alpha",
        "collapse_std",
        "images_per_s",
        "peak_mem_gb",
        "seconds",
    ):
        assert k in m[0] and k in m[1]
    assert "knn_top1" in m[1] and m[1]["knn_top1"] > 0.2  # 10 classes
    assert m[1]["collapse_std"] > 0.5 / math.sqrt(2048)  # not collapsed: about 1/sqrt(d)
    assert {"args.json", "metrics.jsonl", "checkpoint.pt", "backbone.pt"} <= set(os.listdir(d))
    ckpt = torch.load(d / "checkpoint.pt", weights_only=False)
    assert ckpt["method"] == "simsiam" and ckpt["epoch"] == 2
    base = 3 * 32 / 256
    lrs = {g["fix_lr"]: g["lr"] for g in ckpt["optimizer"]["param_groups"]}
    assert lrs[True] == base and lrs[False] < base / 2  # the predictor's LR never decays
    import common

    common.build_backbone(BACKBONE, small_images=True, weights=str(d / "backbone.pt"))


def test_resume_after_kill_ends_with_the_same_weights(straight, tmp_path):
    broken = tmp_path / "broken"
    # start the same run, kill it as soon as epoch 1's checkpoint is written, then resume
    kill_after_first_checkpoint(["simsiam.py"] + RUN, broken)
    run_here(["simsiam.py"] + RUN + ["--resume", str(broken)])
    a = torch.load(straight[0] / "checkpoint.pt", weights_only=False)
    b = torch.load(broken / "checkpoint.pt", weights_only=False)
    assert b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bitwise on the CPU (README)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert len(read_metrics(broken)) == 2


def test_script_with_both_addons(tmp_path):
    d = tmp_path / "run"
    run_here(
        ["simsiam.py"]
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
            "8",
            "--xattn-positives",
            "2",
            "--run-dir",
            str(d),
        ]
    )
    m = read_metrics(d)
    assert all(
        math.isfinite(m[-1][k]) for k in ("loss_ssl", "loss_qscore", "loss_mask", "loss_cls")
    )
    ckpt = torch.load(d / "checkpoint.pt", weights_only=False)
    assert any(k.startswith("xattn.") for k in ckpt["model"])
    backbone = torch.load(d / "backbone.pt")
    assert not any(
        "xattn" in k or "projector" in k or "predictor" in k for k in backbone
    )  # heads dropped


def test_torchrun_two_processes(tmp_path):
    d = tmp_path / "run"
    p = torchrun(
        "simsiam.py",
        TINY + ["--epochs", "1", "--xattn", "--xattn-clusters", "8", "--run-dir", str(d)],
    )
    assert "2 process(es)" in p.stdout
    # --sync-bn is on by default (the recipes use global BN); gloo has no SyncBatchNorm: one
    # note, and the run goes on
    assert p.stdout.count("each process normalizes its own share of the batch") == 1
    m = read_metrics(d)
    assert len(m) == 1 and math.isfinite(m[0]["loss"])
    knn, n = online_knn_of(d)  # the sharded kNN pass of 2 processes, as one process computes it
    assert abs(read_metrics(d)[0]["knn_top1"] - knn) <= 1 / n


def test_bad_input_is_one_sentence_and_exit_2():
    p = run(["simsiam.py", "--batch-size", "33"], env={"WORLD_SIZE": "2", "RANK": "0"}, check=False)
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "error:" in last and "not divisible" in last and "Traceback" not in p.stderr


def test_checkpoint_of_another_method_is_refused(tmp_path):
    torch.save(
        {"method": "simclr", "args": {"backbone": "resnet18"}, "epoch": 1},
        tmp_path / "checkpoint.pt",
    )
    p = run_here(["simsiam.py", "--resume", str(tmp_path)], check=False)
    assert (
        p.returncode == 2
        and "simclr checkpoint, not simsiam" in p.stderr
        and "Traceback" not in p.stderr
    )


def test_non_finite_loss_stops_with_the_step(tmp_path):
    d = tmp_path / "run"
    p = run_here(
        ["simsiam.py"]
        + TINY
        + ["--epochs", "2", "--lr", "1e38", "--knn-every", "0", "--run-dir", str(d)],
        check=False,
    )
    assert p.returncode == 1
    assert "non-finite at epoch 1, step" in p.stdout
    assert not (d / "checkpoint.pt").exists()  # nothing written after the loss went bad
