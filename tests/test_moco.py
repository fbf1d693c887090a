"""moco.py: InfoNCE against Eq. (1), the queue, the momentum encoder, their distributed
forms, each version's views and optimizer, and the script end to end (v2 plain, v3 with
both add-ons, torchrun for each version, resume)."""

import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moco
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

SMALL = ["--proj-hidden", "64", "--pred-hidden", "64", "--proj-dim", "32", "--queue-size", "64"]
# Runs of one process use a batch of 16 (the last --batch-size wins) to keep the suite short.
ONE = TINY + SMALL + ["--batch-size", "16"]
SLOW = 900  # seconds: generous, for a machine shared with other jobs


def slow_infonce(q, k, negatives, t):
    """Eq. (1) of He et al. 2020 written out per query:
    L_i = -log exp(q_i.k_i / t) / (exp(q_i.k_i / t) + sum_j exp(q_i.n_j / t)), averaged;
    negatives[i] lists the n_j of query i."""
    total = 0.0
    for i in range(len(q)):
        qi = F.normalize(q[i], dim=0)
        pos = torch.exp(qi @ k[i] / t)
        total = total - torch.log(pos / (pos + sum(torch.exp(qi @ n / t) for n in negatives[i])))
    return total / len(q)


def test_infonce_matches_equation_1():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 8, generator=g)
    k = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    # v2: the queue holds the negatives of every query
    assert torch.allclose(
        moco.infonce_loss(q, k, queue, 0.2), slow_infonce(q, k, [queue] * 5, 0.2), atol=1e-5
    )
    # v3: the other keys of the batch are the negatives
    others = [torch.cat([k[:i], k[i + 1 :]]) for i in range(5)]
    assert torch.allclose(
        moco.infonce_loss(q, k, None, 0.5), slow_infonce(q, k, others, 0.5), atol=1e-5
    )
    # symmetrized forms: mean of the two directions (v2), their sum scaled by 2t (v3)
    q2, k2 = torch.randn(10, 8, generator=g), F.normalize(torch.randn(10, 8, generator=g), dim=1)
    l12, l21 = (
        moco.infonce_loss(q2[:5], k2[5:], queue, 0.2),
        moco.infonce_loss(q2[5:], k2[:5], queue, 0.2),
    )
    assert torch.allclose(moco.moco_loss(q2, k2, queue, 0.2), (l12 + l21) / 2)
    l12, l21 = (
        moco.infonce_loss(q2[:5], k2[5:], None, 0.2),
        moco.infonce_loss(q2[5:], k2[:5], None, 0.2),
    )
    assert torch.allclose(moco.moco_loss(q2, k2, None, 0.2), 0.4 * (l12 + l21))
    # one direction (MoCo v2's code): queries of view 1 against keys of view 2 only
    assert torch.allclose(
        moco.moco_loss(q2[:5], k2[5:], queue, 0.2, symmetric=False),
        moco.infonce_loss(q2[:5], k2[5:], queue, 0.2),
    )
    assert torch.allclose(moco.moco_loss(q2[:5], k2[5:], None, 0.2, symmetric=False), 0.4 * l12)
    # a query on its own key, far from every negative, has a near-zero loss
    e = torch.eye(4, 8)
    assert moco.infonce_loss(e * 3, e, -e[:1].repeat(6, 1), 0.05) < 1e-3


def test_enqueue_is_first_in_first_out():
    queue = torch.zeros(8, 2)
    ptr = 0
    for step in range(3):  # batches of 4 into a queue of 8: the third write replaces the first
        ptr = moco.enqueue(queue, ptr, torch.full((4, 2), float(step + 1)))
        assert ptr == (step + 1) * 4 % 8
    assert queue[:4].eq(3).all() and queue[4:].eq(2).all()


def test_ema_update_and_momentum_schedule_by_hand():
    args = moco.parse_args(SMALL)
    torch.manual_seed(0)
    model = moco.MoCo(args, small_images=True)
    keys = moco.KeyEncoder(model)
    before = [p.clone() for p in keys.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    moco.ema_update(model, keys, 0.9)
    online = list(model.backbone.parameters()) + list(model.projector.parameters())
    for pk, p0, pq in zip(keys.parameters(), before, online):
        assert torch.allclose(pk, 0.9 * p0 + 0.1 * pq, atol=1e-6)  # 0.9 theta_k + 0.1 theta_q
    assert all(not p.requires_grad for p in keys.parameters())
    # cosine per step from base to end: 0.99 at 0, the midpoint halfway, 0.999 at the end
    assert moco.momentum_at(0, 100, 0.99, 0.999) == 0.99
    assert math.isclose(moco.momentum_at(50, 100, 0.99, 0.999), 0.9945)
    assert math.isclose(moco.momentum_at(100, 100, 0.99, 0.999), 0.999)
    assert moco.parse_args(["--moco-version", "3"]).tau_end == 1.0


@pytest.mark.parametrize("version", [2, 3])
def test_keys_never_get_gradient(version):
    args = moco.parse_args(SMALL + ["--moco-version", str(version)])
    torch.manual_seed(0)
    model = moco.MoCo(args, small_images=True)
    keys = moco.KeyEncoder(model)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    out = model([x1, x2])
    k = moco.momentum_keys(keys, torch.cat([x1, x2]))
    assert not k.requires_grad and torch.allclose(k.norm(dim=1), torch.ones(8))
    queue = F.normalize(torch.randn(8, 32), dim=1) if version == 2 else None
    moco.moco_loss(out["q"], k, queue, 0.2).backward()
    assert all(p.grad is None for p in keys.parameters())
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0


IMAGENET_V2 = ["--moco-version", "2", "--crop-min-scale", "0.2"]
IMAGENET_V3 = ["--moco-version", "3", "--crop-min-scale", "0.2", "--blur-prob", "1.0", "0.1"]


@pytest.mark.parametrize(
    "argv,jitter,scale,blur,solarize",
    [
        (
            [],
            (0.4, 0.4, 0.4, 0.1),
            (0.08, 1.0),
            (0.5, 0.5),
            (0.0, 0.0),
        ),  # solo-learn symmetric_weak.yaml
        (
            ["--moco-version", "3"],
            (0.4, 0.4, 0.2, 0.1),
            (0.08, 1.0),
            (0.0, 0.0),
            (0.0, 0.2),
        ),  # asymmetric.yaml
        (
            IMAGENET_V2,
            (0.4, 0.4, 0.4, 0.1),
            (0.2, 1.0),
            (0.5, 0.5),
            (0.0, 0.0),
        ),  # MoCo v2's aug_plus
        (
            IMAGENET_V3,
            (0.4, 0.4, 0.2, 0.1),
            (0.2, 1.0),
            (1.0, 0.1),
            (0.0, 0.2),
        ),  # MoCo v3's two augmentations
    ],
)
def test_views_are_the_recipes(argv, jitter, scale, blur, solarize):
    views = moco.views_of(moco.parse_args(argv), 32)
    assert len(views) == 2
    for v, b, z in zip(views, blur, solarize):
        assert (
            v.size == 32
            and v.scale == scale
            and v.jitter_p == 0.8
            and v.gray_p == 0.2
            and v.flip_p == 0.5
        )
        assert (
            all(math.isclose(x, y) for x, y in zip(v.jitter, jitter))
            and v.blur_p == b
            and v.solarize_p == z
        )


def test_one_probability_means_both_views_and_three_are_refused(capsys):
    args = moco.parse_args(["--blur-prob", "0.3", "--solarize-prob", "0.1", "0.2"])
    assert args.blur_prob == (0.3, 0.3) and args.solarize_prob == (0.1, 0.2)
    with pytest.raises(SystemExit) as e:
        moco.parse_args(["--blur-prob", "0.1", "0.2", "0.3"])
    assert e.value.code == 2 and "one probability" in capsys.readouterr().err


def test_optimizer_per_version():
    """v2: SGD decays every weight, biases and BN included (MoCo v2's code, solo-learn's SGD);
    v3: LARS in the recipe's mode, 1-d tensors without decay or adaptation."""
    model, _ = _make(2)
    opt = moco.make_optimizer(model, moco.parse_args(SMALL))
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 1
    g = opt.param_groups[0]
    assert (
        g["weight_decay"] == 1e-4
        and g["momentum"] == 0.9
        and len(g["params"]) == len(list(model.parameters()))
    )
    model, _ = _make(3)
    opt = moco.make_optimizer(model, moco.parse_args(SMALL + ["--moco-version", "3"]))
    import common

    assert isinstance(opt, common.LARS)
    decay, no_decay = opt.param_groups
    assert (
        decay["mode"] == "clip"
        and decay["eta"] == 0.02
        and decay["weight_decay"] == 1e-6
        and decay["lars"]
    )
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and not no_decay["lars"]
    opt = moco.make_optimizer(
        model,
        moco.parse_args(
            SMALL + ["--moco-version", "3", "--lars-mode", "official", "--lars-eta", "0.001"]
        ),
    )
    assert opt.param_groups[0]["mode"] == "official" and opt.param_groups[0]["eta"] == 0.001


def test_zero_init_residual_reaches_both_encoders():
    args = moco.parse_args(SMALL + ["--moco-version", "3", "--zero-init-residual"])
    model = moco.MoCo(args, small_images=True)
    keys = moco.KeyEncoder(model)
    for enc in (model.backbone, keys.backbone):
        assert all(
            blk.bn2.weight.abs().sum() == 0 for layer in (enc.layer1, enc.layer4) for blk in layer
        )
    assert (
        moco.MoCo(moco.parse_args(SMALL), small_images=True)
        .backbone.layer1[0]
        .bn2.weight.abs()
        .sum()
        > 0
    )


def _ddp_losses(rank, world, q, k, queue, t):
    b = q.shape[0] // world
    mine = slice(rank * b, (rank + 1) * b)
    out = []
    for qu in (queue, None):
        a = q[mine].clone().requires_grad_()
        loss = moco.infonce_loss(a, k[mine], qu, t)
        loss.backward()
        out.append((loss.item(), a.grad))
    return out


def test_infonce_two_processes_equal_one_process():
    """Each process returns the mean over its b queries; the queue (v2) and the gathered keys
    (v3) are the same everywhere. So: the mean of the two losses == the global loss, and
    grad_r / world == the global loss's gradient w.r.t. rank r's queries."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(8, 6, generator=g)
    k = F.normalize(torch.randn(8, 6, generator=g), dim=1)
    queue = F.normalize(torch.randn(16, 6, generator=g), dim=1)
    results = spawn(_ddp_losses, q, k, queue, 0.2)
    for j, qu in enumerate((queue, None)):
        full = q.clone().requires_grad_()
        loss = moco.infonce_loss(full, k, qu, 0.2)
        loss.backward()
        assert math.isclose(sum(r[j][0] for r in results) / 2, loss.item(), rel_tol=1e-5)
        assert torch.allclose(torch.cat([r[j][1] for r in results]) / 2, full.grad, atol=1e-6)


def _make(version, seed=0):
    args = moco.parse_args(SMALL + ["--moco-version", str(version)])
    torch.manual_seed(seed)
    model = moco.MoCo(args, small_images=True)
    return model, moco.KeyEncoder(model)


def _ddp_steps(rank, world, x1, x2):
    """Eval mode (BN on running statistics): one step's loss and gradients, per version.
    Train mode (shuffled BN): two SGD steps, then the key encoder and the queue."""
    b = x1.shape[0] // world
    mine = slice(rank * b, (rank + 1) * b)
    res = {}
    for version in (2, 3):
        model, keys = _make(version)
        model.eval(), keys.eval()
        ddp = nn.parallel.DistributedDataParallel(model)
        queue = (
            F.normalize(torch.randn(16, 32, generator=torch.Generator().manual_seed(5)), dim=1)
            if version == 2
            else None
        )
        out = ddp([x1[mine], x2[mine]])
        k = moco.momentum_keys(keys, torch.cat([x1[mine], x2[mine]]))  # the shuffle's round trip
        loss = moco.moco_loss(out["q"], k, queue, 0.2)
        loss.backward()
        res[version] = (
            loss.item(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
    model, keys = _make(2)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    queue, ptr, local = (
        F.normalize(torch.randn(16, 32, generator=torch.Generator().manual_seed(5)), dim=1),
        0,
        [],
    )
    for step in range(2):
        out = ddp([x1[mine], x2[mine]])
        moco.ema_update(model, keys, 0.9)
        k = moco.momentum_keys(keys, torch.cat([x1[mine], x2[mine]]))
        opt.zero_grad()
        moco.moco_loss(out["q"], k, queue, 0.2).backward()
        opt.step()
        local.append(k[b:].clone())
        ptr = moco.enqueue(queue, ptr, k[b:])
    res["train"] = (keys.state_dict(), queue, ptr, local)
    return res


def test_two_processes_equal_one_process_and_stay_in_sync():
    """DDP averages parameter gradients and each process returns the mean over its own
    queries (the queue and the gathered keys being shared): in eval mode, the mean of the
    two losses and the averaged gradients equal one process on the global batch. In train
    mode the key encoder (parameters and BN statistics) and the queue are identical on both
    processes after each step, and the queue holds the keys of rank 0, then rank 1."""
    g = torch.Generator().manual_seed(2)
    x1, x2 = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    results = spawn(_ddp_steps, x1, x2)
    for version in (2, 3):
        model, keys = _make(version)
        model.eval(), keys.eval()
        queue = (
            F.normalize(torch.randn(16, 32, generator=torch.Generator().manual_seed(5)), dim=1)
            if version == 2
            else None
        )
        out = model([x1, x2])
        loss = moco.moco_loss(out["q"], moco.momentum_keys(keys, torch.cat([x1, x2])), queue, 0.2)
        loss.backward()
        assert math.isclose(sum(r[version][0] for r in results) / 2, loss.item(), rel_tol=1e-5)
        for n, p in model.named_parameters():
            if p.grad is not None:
                assert torch.allclose(results[0][version][1][n], p.grad, atol=1e-6, rtol=1e-4), (
                    version,
                    n,
                )
    (s0, q0, p0, k0), (s1, q1, p1, k1) = results[0]["train"], results[1]["train"]
    for n in s0:
        assert torch.equal(s0[n], s1[n]), n
    assert torch.equal(q0, q1) and p0 == p1 == 0  # 2 steps of 8 keys filled the queue of 16
    assert torch.equal(
        q0, torch.cat([k0[0], k1[0], k0[1], k1[1]])
    )  # FIFO, rank order within a step


ARGS = ONE + ["--epochs", "2", "--knn-every", "2"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    d = tmp_path_factory.mktemp("moco") / "straight"
    p = run_here(["moco.py"] + ARGS + ["--run-dir", str(d)])
    return d, p


def test_script_trains_and_writes_the_run(straight):
    d, p = straight
    assert "moco v2" in p.stdout and "img/s" in p.stdout and "online-knn" in p.stdout
    m = read_metrics(d)
    assert [r["epoch"] for r in m] == [1, 2] and m[1]["knn_top1"] > 0.2
    for k in (
        "loss",
        "loss_ssl",
        "lr",
        "tau",
        "qscore",
        "qscore_active",
        "qscore_under_alpha",
        "collapse_std",
        "images_per_s",
        "peak_mem_gb",
        "seconds",
    ):
        assert k in m[0], k
    assert 0.99 < m[0]["tau"] < m[1]["tau"] < 0.999
    assert {"args.json", "metrics.jsonl", "checkpoint.pt", "backbone.pt"} <= set(os.listdir(d))
    ckpt = torch.load(d / "checkpoint.pt", weights_only=False)
    assert ckpt["queue"].shape == (64, 32) and ckpt["queue_ptr"] == (2 * 3 * 16) % 64
    assert ckpt["momentum_step"] == 6 and "projector.0.weight" in ckpt["key_encoder"]
    import common

    common.build_backbone(BACKBONE, small_images=True, weights=str(d / "backbone.pt"))


def test_resume_after_kill_ends_with_the_same_state(straight, tmp_path):
    broken = tmp_path / "broken"
    # start the same run, kill it as soon as epoch 1's checkpoint is written, then resume
    kill_after_first_checkpoint(["moco.py"] + ARGS, broken, deadline=SLOW)
    run_here(["moco.py"] + ARGS + ["--resume", str(broken)])
    a = torch.load(straight[0] / "checkpoint.pt", weights_only=False)
    b = torch.load(broken / "checkpoint.pt", weights_only=False)
    assert (
        b["epoch"] == 2
        and a["queue_ptr"] == b["queue_ptr"]
        and a["momentum_step"] == b["momentum_step"]
    )
    for part in ("model", "key_encoder"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)  # bitwise on the CPU (README)
    assert torch.equal(a["queue"], b["queue"])
    assert len(read_metrics(broken)) == 2


def test_v3_with_both_addons(tmp_path):
    d = tmp_path / "run"
    run_here(
        ["moco.py"]
        + ONE
        + [
            "--moco-version",
            "3",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--qscore-lambda",
            "0.1",
            "--xattn",
            "--xattn-clusters",
            "8",
            "--knn-every",
            "0",
            "--run-dir",
            str(d),
        ],
    )
    m = read_metrics(d)
    assert all(
        k in m[-1] for k in ("loss_ssl", "loss_qscore", "loss_mask", "loss_cls", "collapse_std")
    )
    assert m[-1]["tau"] > 0.99
    ckpt = torch.load(d / "checkpoint.pt", weights_only=False)
    assert ckpt["queue"] is None and any(k.startswith("predictor.") for k in ckpt["model"])
    assert any(k.startswith("xattn.") for k in ckpt["model"]) and not any(
        "xattn" in k for k in ckpt["key_encoder"]
    )
    backbone = torch.load(d / "backbone.pt")
    assert not any("xattn" in k or "projector" in k for k in backbone)  # the head is dropped


def test_torchrun_two_processes(tmp_path):
    """v2 as MoCo v2's code runs it: shuffled BN, one direction."""
    d = tmp_path / "run"
    p = torchrun(
        "moco.py",
        TINY + SMALL + ["--epochs", "1", "--no-symmetric-loss", "--run-dir", str(d)],
        timeout=SLOW,
    )
    assert "2 process(es)" in p.stdout and "BN shuffled" in p.stdout and "note:" not in p.stdout
    knn, n = online_knn_of(d)  # the sharded kNN pass of 2 processes, as one process computes it
    assert abs(read_metrics(d)[0]["knn_top1"] - knn) <= 1 / n
    ckpt = torch.load(d / "checkpoint.pt", weights_only=False)
    assert ckpt["queue_ptr"] == 3 * 32 % 64  # 32 keys a step from both processes together


def test_torchrun_v3_global_bn_on_cpu_says_so_once(tmp_path):
    """v3 asks for SyncBatchNorm, which PyTorch runs on CUDA only: on CPU one line says so and
    the run goes on with per-process BN (no shuffle either)."""
    d = tmp_path / "run"
    p = torchrun(
        "moco.py",
        TINY
        + SMALL
        + ["--moco-version", "3", "--epochs", "1", "--knn-every", "0", "--run-dir", str(d)],
        timeout=SLOW,
    )
    assert p.stdout.count("note: SyncBatchNorm needs CUDA") == 1 and "BN per process" in p.stdout
    assert len(read_metrics(d)) == 1


@pytest.mark.parametrize(
    "argv,world,needle",
    [
        (["--queue-size", "100"], "1", "not a multiple of --batch-size"),
        (["--batch-size", "33"], "2", "not divisible by the 2 processes"),
    ],
)
def test_bad_input_is_refused_before_any_work(argv, world, needle, monkeypatch):
    """common.check_run with moco.check_args raises UserError (one sentence, exit 2 in __main__:
    see the next test). Global BN on CPU is not bad input any more: the run goes on (see the
    torchrun v3 test)."""
    import common

    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(common.UserError, match=needle):
        common.check_run(moco.parse_args(argv), moco.METHOD, moco.check_args)
    common.check_run(
        moco.parse_args(["--sync-bn", "--device", "cpu", "--batch-size", "32"]),
        moco.METHOD,
        moco.check_args,
    )


def test_checkpoint_of_another_version_is_refused(tmp_path):
    torch.save(
        {"method": "moco", "args": {"backbone": "resnet18", "moco_version": 2}, "epoch": 1},
        tmp_path / "checkpoint.pt",
    )
    p = run_here(["moco.py", "--moco-version", "3", "--resume", str(tmp_path)], check=False)
    assert (
        p.returncode == 2
        and "MoCo v2, not --moco-version 3" in p.stderr
        and "Traceback" not in p.stderr
    )


def test_non_finite_loss_stops_with_the_step(tmp_path):
    d = tmp_path / "run"
    p = run_here(
        ["moco.py"]
        + ONE
        + [
            "--epochs",
            "2",
            "--lr",
            "1e38",
            "--warmup-epochs",
            "0",
            "--knn-every",
            "0",
            "--run-dir",
            str(d),
        ],
        check=False,
    )
    assert p.returncode == 1 and "non-finite at epoch 1, step" in p.stdout
    assert not (d / "checkpoint.pt").exists()
