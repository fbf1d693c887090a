"""dino.py: the loss against Eq. (3), the center against a hand computation, their distributed
forms, multi-crop, the head, the schedules, and the script end to end (resume, torchrun,
add-ons)."""

import math
import os

import pytest
import torch
import torch.nn as nn

import common
import dino
from conftest import (
    BACKBONE,
    TINY,
    kill_after_first_checkpoint,
    online_knn_of,
    read_metrics,
    run_here,
    spawn,
    torchrun,
)

# A small head keeps the end-to-end runs short; two local crops still exercise multi-crop.
SMALL = TINY + [
    "--local-crops",
    "2",
    "--proj-hidden",
    "64",
    "--proj-dim",
    "32",
    "--prototypes",
    "128",
]


def slow_dino_loss(student, teacher, center, ts, tt, n_crops):
    """Eq. (3) of Caron et al. 2021 written out image by image and pair by pair:
    for image i, sum over global crops g and crops v != g of H(P_t(x_g), P_s(x_v)),
    P_t = softmax((t - c) / tau_t), P_s = softmax(s / tau_s); averaged over pairs and images."""
    b = teacher.shape[0] // 2
    total, terms = 0.0, 0
    for i in range(b):
        for g in range(2):
            p_t = torch.softmax((teacher[g * b + i] - center[0]) / tt, dim=0)
            for v in range(n_crops):
                if v == g:
                    continue
                p_s = torch.softmax(student[v * b + i] / ts, dim=0)
                total = total - (p_t * torch.log(p_s)).sum()
                terms += 1
    return total / terms


def test_dino_loss_matches_equation_3():
    g = torch.Generator().manual_seed(0)
    b, v, k = 3, 4, 10
    s, t, c = (
        torch.randn(v * b, k, generator=g),
        torch.randn(2 * b, k, generator=g),
        torch.randn(1, k, generator=g),
    )
    got = dino.dino_loss(s, t, c, 0.1, 0.04)
    assert torch.allclose(got, slow_dino_loss(s, t, c, 0.1, 0.04, v), atol=1e-5)
    # Two crops whose student distribution is the other crop's teacher target: the loss is the
    # targets' entropy (its minimum), and the student gets no gradient.
    t2 = torch.randn(2 * b, k, generator=g)
    s2 = ((t2 - c) / 0.04 * 0.1).view(2, b, k).flip(0).reshape(2 * b, k).requires_grad_()
    loss = dino.dino_loss(s2, t2, c, 0.1, 0.04)
    loss.backward()
    log_p = torch.log_softmax((t2 - c) / 0.04, 1)
    assert math.isclose(loss.item(), -(log_p.exp() * log_p).sum(1).mean().item(), rel_tol=1e-4)
    assert s2.grad.abs().max() < 1e-6
    # no gradient reaches the teacher
    t3 = t.clone().requires_grad_()
    dino.dino_loss(s.clone().requires_grad_(), t3, c).backward()
    assert t3.grad is None


def test_center_update_against_hand_computation():
    t = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 0.0, 6.0], [4.0, 4.0, 2.0]])
    c = torch.tensor([[1.0, 1.0, 1.0]])
    new = dino.update_center(c, t, momentum=0.9)
    # batch mean (2, 2, 3); 0.9 * 1 + 0.1 * mean
    assert torch.allclose(new, torch.tensor([[1.1, 1.1, 1.2]]))
    assert torch.equal(c, torch.tensor([[1.0, 1.0, 1.0]]))  # the old center is not changed in place


def _ddp_center(rank, world, t, c):
    b = (
        t.shape[0] // 2 // world
    )  # images per process; t is (2B, K): global crop 1 rows, then crop 2
    mine = t.view(2, -1, t.shape[1])[:, rank * b : (rank + 1) * b].reshape(2 * b, -1)
    return dino.update_center(c, mine, 0.9)


def test_center_is_identical_on_two_processes():
    g = torch.Generator().manual_seed(2)
    t, c = torch.randn(2 * 6, 7, generator=g), torch.randn(1, 7, generator=g)
    one = dino.update_center(c, t, 0.9)
    r0, r1 = spawn(_ddp_center, t, c)
    assert torch.allclose(r0, one, atol=1e-6) and torch.equal(r0, r1)


def _rows(x, views, rank, b):
    """This rank's rows of a crop-major (views*B, K) tensor."""
    return x.view(views, -1, x.shape[-1])[:, rank * b : (rank + 1) * b].reshape(views * b, -1)


def _ddp_dino_loss(rank, world, s, t, c, v):
    b = t.shape[0] // 2 // world
    mine = _rows(s, v, rank, b).clone().requires_grad_()
    loss = dino.dino_loss(mine, _rows(t, 2, rank, b), c, 0.1, 0.05)
    loss.backward()
    return loss.item(), mine.grad


def test_dino_loss_two_processes_equal_one_process():
    """Each process returns the mean over its own b images of a loss that couples no two images
    (the center is given), so: the mean of the 2 losses == the global loss, and
    rank r's gradient / world == the global loss's gradient w.r.t. rank r's rows."""
    g = torch.Generator().manual_seed(1)
    v, n, k = 4, 6, 9
    s, t, c = (
        torch.randn(v * n, k, generator=g),
        torch.randn(2 * n, k, generator=g),
        torch.randn(1, k, generator=g),
    )
    full = s.clone().requires_grad_()
    loss = dino.dino_loss(full, t, c, 0.1, 0.05)
    loss.backward()
    (l0, g0), (l1, g1) = spawn(_ddp_dino_loss, s, t, c, v)
    assert math.isclose((l0 + l1) / 2, loss.item(), rel_tol=1e-5)
    for r, gr in enumerate((g0, g1)):
        assert torch.allclose(gr / 2, _rows(full.grad, v, r, n // 2), atol=1e-7)


def _small_model():
    torch.manual_seed(0)
    return dino.DINO(
        dino.parse_args(["--proj-hidden", "32", "--proj-dim", "16", "--prototypes", "24"]),
        small_images=True,
    )


def _crops(n):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(n, 3, 8, 8, generator=g) for _ in range(2)
    ]


def _ddp_step(rank, world, t, c):
    crops = _crops(8)
    b = 8 // world
    model = _small_model().eval()  # running statistics: each image's output is its own
    ddp = nn.parallel.DistributedDataParallel(model)
    out = ddp([x[rank * b : (rank + 1) * b] for x in crops])
    loss = dino.dino_loss(out["student_logits"], _rows(t, 2, rank, b), c, 0.1, 0.04)
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_ddp_forward_and_gradients_equal_one_process():
    """The DDP-wrapped student (multi-crop forward, one call per step) and the loss on 2 gloo
    processes against 1 process on the same 8 images. BN in eval mode, so that outputs do not
    depend on the per-process batch; the teacher logits and the center are given (the
    teacher's BN uses each process's batch, as DINO's does without SyncBN). DDP averages the
    gradients, each process's loss is its own mean: both equal the one-process ones."""
    g = torch.Generator().manual_seed(4)
    t, c = torch.randn(16, 24, generator=g), torch.randn(1, 24, generator=g)
    model = _small_model().eval()
    loss = dino.dino_loss(model(_crops(8))["student_logits"], t, c, 0.1, 0.04)
    loss.backward()
    (l0, g0), (l1, g1) = spawn(_ddp_step, t, c)
    assert math.isclose((l0 + l1) / 2, loss.item(), rel_tol=1e-5)
    for k, p in model.named_parameters():
        assert torch.allclose(g0[k], p.grad, atol=1e-6, rtol=1e-4), k
        assert torch.equal(g0[k], g1[k]), k


def test_views_follow_dino():
    v = dino.dino_views(224, 6)  # the function's defaults: main_dino.py's
    assert [x.size for x in v] == [224, 224] + [96] * 6
    assert [x.blur_p for x in v] == [1.0, 0.1] + [0.5] * 6
    assert [x.solarize_p for x in v] == [0.0, 0.2] + [0.0] * 6
    assert all(x.scale == (0.4, 1.0) for x in v[:2]) and all(x.scale == (0.05, 0.4) for x in v[2:])
    assert all(x.jitter == (0.4, 0.4, 0.2, 0.1) for x in v)
    small = dino.dino_views(32, 2, (0.14, 1.0), (0.05, 0.14))
    assert [x.size for x in small] == [32, 32, 16, 16] and [x.blur_p for x in small] == [
        1.0,
        0.1,
        0.5,
        0.5,
    ]
    assert small[0].scale == (0.14, 1.0) and small[2].scale == (0.05, 0.14)


def test_script_defaults_are_solo_learns_cifar_views():
    """asymmetric.yaml: 2 crops of 32 px at (0.08, 1), no blur, the second solarized with p 0.2."""
    a = dino.parse_args([])
    v = dino.dino_views(
        32, a.local_crops, a.global_scale, a.local_scale, a.blur_prob, a.solarize_prob
    )
    assert [x.size for x in v] == [32, 32] and all(x.scale == (0.08, 1.0) for x in v)
    assert [x.blur_p for x in v] == [0.0, 0.0] and [x.solarize_p for x in v] == [0.0, 0.2]
    assert all(x.jitter == (0.4, 0.4, 0.2, 0.1) for x in v)


def test_multicrop_batches_and_one_backbone_pass_per_size():
    views = dino.dino_views(16, 3)
    loader = common.TrainLoader(
        common.make_dataset("digits", "data"),
        views,
        4,
        common.STATS["digits"],
        torch.device("cpu"),
        workers=0,
        positive=common.positive_view(16),
    )
    loader.set_clusters(torch.arange(1437).numpy() % 5, 2)
    crops, idx, pos = next(iter(loader))
    assert [tuple(c.shape) for c in crops] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 3
    assert pos.shape == (8, 3, 16, 16) and idx.shape == (4,)
    args = dino.parse_args(
        [
            "--proj-hidden",
            "32",
            "--proj-dim",
            "16",
            "--prototypes",
            "24",
            "--xattn",
            "--xattn-clusters",
            "5",
        ]
    )
    model = dino.DINO(args, small_images=True)
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    out = model(crops, pos)
    # global crops and positives share one pass, the local crops another
    assert calls == [(2 * 4 + 8, 3, 16, 16), (3 * 4, 3, 8, 8)]
    assert out["student_logits"].shape == (5 * 4, 24)
    assert out["h"].shape == (8, 512) and out["z"].shape == (8, 16)
    assert out["f"].shape[0] == 4 + 8 and out["logits"].shape == (12, 5)
    # the student's logits for a crop do not depend on which pass it went through
    model.eval()
    alone = model.head(model.backbone(crops[3])[1])[1]
    assert torch.allclose(model(crops)["student_logits"][3 * 4 : 4 * 4], alone, atol=1e-5)


def test_head_is_weight_normalized():
    head = dino.DINOHead(12, 32, 8, 20)
    h = torch.randn(5, 12)
    z, s = head(h)
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-6)
    assert s.abs().max() <= 1 + 1e-6  # cosines
    with torch.no_grad():
        head.last_layer.weight.mul_(torch.rand(20, 1) * 10 + 0.1)  # row norms do not matter
    assert torch.allclose(head(h)[1], s, atol=1e-6)


def test_schedules():
    assert dino.teacher_temp_at(0, 50, 0.04, 0.07) == 0.04
    assert math.isclose(dino.teacher_temp_at(49, 50, 0.04, 0.07), 0.07)
    assert math.isclose(dino.teacher_temp_at(20, 50, 0.04, 0.07), 0.04 + 0.03 * 20 / 49)
    assert (
        dino.teacher_temp_at(80, 50, 0.04, 0.07) == 0.07
        and dino.teacher_temp_at(0, 0, 0.04, 0.07) == 0.07
    )
    assert dino.momentum_at(0, 100, 0.996) == 0.996 and dino.momentum_at(100, 100, 0.996) == 1.0
    assert math.isclose(dino.momentum_at(50, 100, 0.996), 0.998)


def test_teacher_ema_and_clipping():
    student = _small_model()
    teacher = dino.Teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(
        isinstance(b, torch.Tensor) and "running" in n for n, b in teacher.named_buffers()
    )
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    dino.ema_update(teacher, student, 0.75)
    online = list(student.backbone.parameters()) + list(student.head.parameters())
    for t, b0, s in zip(teacher.parameters(), before, online):
        assert torch.allclose(t, 0.75 * b0 + 0.25 * s, atol=1e-6)
    # teacher output: the global crops only, identical in train and eval mode (batch statistics)
    crops = _crops(4)
    assert teacher(crops[:2]).shape == (8, 24)
    assert torch.allclose(teacher.eval()(crops[:2]), teacher.train()(crops[:2]))
    # per-tensor clipping
    lin = nn.Linear(3, 2)
    lin.weight.grad, lin.bias.grad = torch.full((2, 3), 10.0), torch.tensor([0.3, 0.4])
    dino.clip_gradients(lin, 3.0)
    assert math.isclose(lin.weight.grad.norm().item(), 3.0, rel_tol=1e-5)
    assert torch.allclose(lin.bias.grad, torch.tensor([0.3, 0.4]))


def _initial_last_layer(argv):
    torch.manual_seed(0)  # what main() does before building the model
    return dino.DINO(dino.parse_args(argv), small_images=True).head.last_layer.weight.detach()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Two epochs without a break: the end-to-end checks and the reference of the resume test."""
    d = tmp_path_factory.mktemp("straight") / "run"
    p = run_here(
        ["dino.py"]
        + SMALL
        + ["--epochs", "2", "--knn-every", "2", "--warmup-epochs", "0", "--run-dir", str(d)]
    )
    return d, p


def test_script_trains_and_writes_the_run(straight):
    d, p = straight
    assert "img/s" in p.stdout and "online-knn" in p.stdout
    m = read_metrics(d)
    assert [r["epoch"] for r in m] == [1, 2]
    for k in (
        "loss",
        "loss_ssl",
        "lr",
        "teacher_temp",
        "teacher_momentum",
        "qscore",
        "qscore_active",
        "qscore_under_alpha",
        "collapse_std",
        "images_per_s",
        "peak_mem_gb",
        "seconds",
    ):
        assert k in m[0] and math.isfinite(m[0][k]), k
    assert "knn_top1" in m[1] and m[1]["knn_top1"] > 0.2  # 10 classes: chance is 0.1
    assert {"args.json", "metrics.jsonl", "checkpoint.pt", "backbone.pt"} <= set(os.listdir(d))
    ckpt = torch.load(d / "checkpoint.pt", weights_only=False)
    assert (
        ckpt["method"] == "dino"
        and ckpt["center"].shape == (1, 128)
        and ckpt["center"].abs().sum() > 0
    )
    assert any(k.startswith("head.") for k in ckpt["teacher"])
    backbone = torch.load(d / "backbone.pt")
    assert not any("head" in k for k in backbone)
    common.build_backbone(BACKBONE, small_images=True, weights=str(d / "backbone.pt"))
    # the last layer moved in epoch 2, after being frozen in epoch 1 (checked in the add-ons run)
    assert not torch.equal(ckpt["model"]["head.last_layer.weight"], _initial_last_layer(SMALL))


def test_script_with_both_addons_and_frozen_last_layer(tmp_path):
    d = tmp_path / "run"
    argv = SMALL + [
        "--epochs",
        "1",
        "--qscore-lambda",
        "0.1",
        "--xattn",
        "--xattn-clusters",
        "8",
        "--xattn-positives",
        "2",
    ]
    run_here(["dino.py"] + argv + ["--knn-every", "0", "--run-dir", str(d)])
    m = read_metrics(d)
    assert all(k in m[0] for k in ("loss_qscore", "loss_mask", "loss_cls"))
    ckpt = torch.load(d / "checkpoint.pt", weights_only=False)
    assert any(k.startswith("xattn.") for k in ckpt["model"])
    assert not any("xattn" in k for k in torch.load(d / "backbone.pt"))
    # DINO keeps the last layer fixed during the first epoch (--freeze-last-layer 1)
    assert torch.equal(ckpt["model"]["head.last_layer.weight"], _initial_last_layer(argv))


def test_torchrun_two_processes(tmp_path):
    d = tmp_path / "run"
    p = torchrun("dino.py", SMALL + ["--epochs", "1", "--run-dir", str(d)])
    assert "2 process(es)" in p.stdout
    assert (
        p.stdout.count("SyncBatchNorm needs CUDA") == 1
    )  # global BN is the default; on CPU said once, not refused
    knn, n = online_knn_of(d)  # the sharded kNN pass of 2 processes, as one process computes it
    assert abs(read_metrics(d)[0]["knn_top1"] - knn) <= 1 / n


def test_resume_after_kill_ends_with_the_same_weights_teacher_and_center(straight, tmp_path):
    ref, _ = straight
    argv = ["dino.py"] + SMALL + ["--epochs", "2", "--knn-every", "2", "--warmup-epochs", "0"]
    broken = tmp_path / "broken"
    # start the same run, kill it as soon as epoch 1's checkpoint is written, then resume
    first = kill_after_first_checkpoint(argv, broken)
    run_here(argv + ["--resume", str(broken)])
    a = torch.load(ref / "checkpoint.pt", weights_only=False)
    b = torch.load(broken / "checkpoint.pt", weights_only=False)
    assert b["epoch"] == 2
    assert not torch.equal(first["center"], b["center"])
    assert torch.equal(a["center"], b["center"])  # bitwise on the CPU (README)
    for part in ("model", "teacher"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert len(read_metrics(broken)) == 2


@pytest.mark.parametrize(
    "argv,env,needle",
    [
        (["--dataset", "folder", "--data-dir", "/nonexistent"], {}, "does not exist"),
        (["--batch-size", "33"], {"WORLD_SIZE": "2"}, "not divisible"),
        (["--resume", "/nonexistent/run"], {}, "no checkpoint"),
    ],
)
def test_bad_input_is_caught_before_any_work(argv, env, needle, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(common.UserError, match=needle):
        common.check_run(dino.parse_args(argv), dino.METHOD)


def test_checkpoint_of_another_method_is_one_sentence_and_exit_2(tmp_path):
    torch.save(
        {"method": "swav", "args": {"backbone": "resnet18"}, "epoch": 1}, tmp_path / "checkpoint.pt"
    )
    p = run_here(["dino.py", "--resume", str(tmp_path)], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        f"error: --resume: '{tmp_path / 'checkpoint.pt'}' is a swav checkpoint, not dino."
    ]


def test_non_finite_loss_stops_with_the_step(tmp_path):
    d = tmp_path / "run"
    p = run_here(
        ["dino.py"]
        + SMALL
        + ["--epochs", "2", "--lr", "1e38", "--warmup-epochs", "0", "--run-dir", str(d)],
        check=False,
    )
    assert p.returncode == 1, p.stdout + p.stderr
    assert "non-finite at epoch 1, step" in p.stdout
    assert not (d / "checkpoint.pt").exists()


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        dino.parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in (
        "--local-crops",
        "--global-scale",
        "--blur-prob",
        "--solarize-prob",
        "--lars-mode",
        "--zero-init-residual",
        "--no-sync-bn",
        "--teacher-temp",
        "--center-momentum",
        "--clip-grad",
        "--freeze-last-layer",
        "--optimizer",
        "--qscore-lambda",
        "--xattn-positives",
        "--resume",
    ):
        assert flag in out
    assert "(DINO" in out and "(solo-learn" in out  # defaults say where they come from
