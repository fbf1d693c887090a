"""swav.py: Sinkhorn against its marginals and closed form, the swapped-prediction loss against
the paper's equations, their 2-process forms, and the script end to end (queue, resume)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import swav
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

# Small heads and 2 local crops keep the subprocess runs short; the method is the same.
SMALL = ["--local-crops", "2", "--prototypes", "30", "--proj-hidden", "64", "--proj-dim", "32"]


def cosines(n, k, seed, d=8):
    g = torch.Generator().manual_seed(seed)
    return (
        F.normalize(torch.randn(n, d, generator=g), dim=1)
        @ F.normalize(torch.randn(k, d, generator=g), dim=1).T
    )


def test_sinkhorn_meets_the_marginals_in_the_closed_form():
    s = cosines(48, 12, seed=0)  # (B, K) scores z^T c in [-1, 1]
    q = swav.sinkhorn(s, epsilon=0.05, iterations=3)
    assert q.shape == (48, 12) and (q >= 0).all()
    assert torch.allclose(
        q.sum(1), torch.ones(48), atol=1e-5
    )  # every sample's code is a distribution
    # prototypes: B/K = 4 each; each iteration gets closer than the plain softmax ...
    dev = [(torch.softmax(s / 0.05, dim=1).sum(0) - 4).abs().mean()]
    dev += [(swav.sinkhorn(s, 0.05, i).sum(0) - 4).abs().mean() for i in (1, 3, 10)]
    assert dev[0] > dev[1] > dev[2] > dev[3]
    # ... and many iterations reach it
    q = swav.sinkhorn(s, epsilon=0.05, iterations=300).double()
    assert torch.allclose(q.sum(0), torch.full((12,), 4.0, dtype=torch.float64), rtol=1e-3)
    # Q* = Diag(u) exp(S / eps) Diag(v): log(Q / exp(S / eps)) is a sum of a row and a column term
    r = q.log() - s.double() / 0.05
    assert torch.allclose(r - r[:, :1] - r[:1, :] + r[0, 0], torch.zeros_like(r), atol=1e-4)
    # a larger epsilon gives smoother codes
    assert swav.sinkhorn(s, 1.0).max() < swav.sinkhorn(s, 0.05).max()


def slow_swav_loss(scores, codes, t):
    """Eq. 1-2 of Caron et al. 2020 with multi-crop, written out sample by sample:
    p_v^(k) = exp(z_v^T c_k / t) / sum_k' exp(z_v^T c_k' / t),
    l(z_v, q_i) = -sum_k q_i^(k) log p_v^(k),
    summed over code crops i in {0, 1} and crops v != i, divided by 2 (V-1) b."""
    v_count, b, k_count = scores.shape
    total = 0.0
    for i in range(2):
        for v in range(v_count):
            if v == i:
                continue
            for n in range(b):
                denom = sum(math.exp(scores[v, n, k].item() / t) for k in range(k_count))
                total -= sum(
                    codes[i, n, k].item() * math.log(math.exp(scores[v, n, k].item() / t) / denom)
                    for k in range(k_count)
                )
    return total / (2 * (v_count - 1) * b)


def test_swav_loss_matches_the_equations_and_swaps():
    scores = cosines(4 * 3, 5, seed=1).view(4, 3, 5)  # V=4 crops, b=3 images, K=5
    codes = swav.sinkhorn(scores[:2].reshape(6, 5)).view(2, 3, 5)
    assert math.isclose(
        swav.swav_loss(scores, codes, 0.1).item(), slow_swav_loss(scores, codes, 0.1), rel_tol=1e-5
    )
    # swapped: crop 0 predicts crop 1's code and vice versa, never its own
    s = torch.tensor(
        [[[1.0, -1.0]], [[-1.0, 1.0]]]
    )  # crop 0 points at prototype 0, crop 1 at prototype 1
    own = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # each crop's code is where it points
    assert swav.swav_loss(s, own, 0.1).item() > 10  # so each must predict the other's: far off
    assert swav.swav_loss(s, own.flip(0), 0.1).item() < 1e-6


def _ddp_codes_and_loss(rank, world, scores, queue, protos):
    b, length = scores.shape[1] // world, queue.shape[1] // world
    mine = scores[:, rank * b : (rank + 1) * b].clone().requires_grad_()
    plain = swav.sinkhorn(scores[0, rank * b : (rank + 1) * b])
    codes = swav.assign_codes(
        mine.detach(), queue[:, rank * length : (rank + 1) * length], protos, 0.05, 3
    )
    loss = swav.swav_loss(mine, codes, 0.1)
    loss.backward()
    return plain, codes, loss.item(), mine.grad


def test_sinkhorn_codes_and_loss_two_processes_equal_one_process():
    """Sinkhorn's sums run over both processes, so each process gets the rows of the codes one
    process computes on the global batch and the global queue (the order of the Sinkhorn batch
    does not matter). Each process's loss is the mean over its b images and DDP averages
    gradients: mean of the losses == the global loss, and grad_r / world == the global loss's
    gradient w.r.t. rank r's rows."""
    protos = F.normalize(
        torch.randn(7, 4, generator=torch.Generator().manual_seed(2)), dim=1
    )  # (K, d)
    z = F.normalize(
        torch.randn(3, 8, 4, generator=torch.Generator().manual_seed(3)), dim=2
    )  # V=3, B=8
    scores = z @ protos.T  # (V, B, K)
    queue = F.normalize(
        torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(4)), dim=2
    )  # 3 rows per process
    full = scores.clone().requires_grad_()
    plain = swav.sinkhorn(scores[0])
    codes = swav.assign_codes(scores, queue, protos, 0.05, 3)
    loss = swav.swav_loss(full, codes, 0.1)
    loss.backward()
    results = spawn(_ddp_codes_and_loss, scores, queue, protos)
    assert torch.allclose(torch.cat([r[0] for r in results]), plain, atol=1e-5)
    assert torch.allclose(torch.cat([r[1] for r in results], dim=1), codes, atol=1e-5)
    assert not torch.allclose(
        swav.assign_codes(scores, None, protos, 0.05, 3), codes, atol=1e-3
    )  # the queue counts
    assert math.isclose(sum(r[2] for r in results) / 2, loss.item(), rel_tol=1e-5)
    assert torch.allclose(torch.cat([r[3] for r in results], dim=1) / 2, full.grad, atol=1e-6)


def tiny_model(backbone="resnet18"):  # the scripts' runs: TINY's BACKBONE, for their initial values
    torch.manual_seed(0)
    return swav.SwAV(
        swav.parse_args(SMALL + ["--backbone", backbone]), small_images=True
    ).eval()  # eval: BN independent of the split


def step_loss(model, ddp, crops, queue):  # main's step: ddp is model or its DDP wrapper
    out = ddp(crops)
    scores = out["scores"].unflatten(0, (len(crops), crops[0].shape[0]))
    codes = swav.assign_codes(scores.detach(), queue, model.prototypes.weight.detach(), 0.05, 3)
    return swav.swav_loss(scores, codes, 0.1)


def _ddp_step(rank, world, crops, queue):
    model = tiny_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    b, length = crops[0].shape[0] // world, queue.shape[1] // world
    loss = step_loss(
        model,
        ddp,
        [c[rank * b : (rank + 1) * b] for c in crops],
        queue[:, rank * length : (rank + 1) * length],
    )
    loss.backward()
    return loss.item(), {
        k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None
    }


def test_ddp_forward_and_gradients_equal_one_process():
    """The whole step (multi-crop forward, codes with a queue, loss, backward) in 2 DDP processes
    against one process on the same global batch; BatchNorm in eval mode so that the split of
    the batch cannot matter. DDP averages the gradients: they equal the single-process ones."""
    g = torch.Generator().manual_seed(5)
    crops = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)
    ]
    queue = F.normalize(torch.randn(2, 8, 32, generator=g), dim=2)
    model = tiny_model()
    loss = step_loss(model, model, crops, queue)
    loss.backward()
    results = spawn(_ddp_step, crops, queue)
    assert math.isclose(sum(r[0] for r in results) / 2, loss.item(), rel_tol=1e-5)
    grads = results[0][1]
    assert set(grads) == {k for k, p in model.named_parameters() if p.grad is not None}
    for k, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[k], p.grad, atol=1e-6, rtol=1e-4), k
            assert torch.equal(grads[k], results[1][1][k]), k


def test_script_trains_with_the_queue_and_frozen_prototypes(tmp_path):
    d = tmp_path / "run"
    p = run_here(
        ["swav.py"]
        + TINY
        + SMALL
        + [
            "--epochs",
            "2",
            "--knn-every",
            "2",
            "--queue-size",
            "64",
            "--queue-start",
            "1",
            "--freeze-prototypes-epochs",
            "2",
            "--run-dir",
            str(d),
        ]
    )
    assert "img/s" in p.stdout and "online-knn" in p.stdout
    m = read_metrics(d)
    assert [r["epoch"] for r in m] == [1, 2]
    for k in (
        "loss_ssl",
        "loss",
        "lr",
        "knn_top1",
        "qscore",
        "qscore_active",
        "qscore_under_alpha",
        "collapse_std",
        "images_per_s",
        "peak_mem_gb",
        "seconds",
    ):
        assert k in m[-1] and math.isfinite(m[-1][k]), k
    # the queue starts filling at epoch 2 (index 1) and joins only once full: 64 rows = 2
    # batches of 32
    assert [r["queue_used"] for r in m] == [0.0, pytest.approx(1 / 3)]
    ckpt = torch.load(d / "checkpoint.pt", weights_only=False)
    assert ckpt["method"] == "swav" and ckpt["epoch"] == 2 and ckpt["queue"].shape == (2, 64, 32)
    assert torch.allclose(
        ckpt["queue"].norm(dim=2), torch.ones(2, 64), atol=1e-4
    )  # full of normalized z
    # frozen for both epochs: the prototypes are their normalized initial values, the
    # projector moved
    init = tiny_model(BACKBONE).state_dict()
    assert torch.allclose(
        ckpt["model"]["prototypes.weight"], F.normalize(init["prototypes.weight"], dim=1), atol=1e-6
    )
    assert not torch.allclose(ckpt["model"]["projector.0.weight"], init["projector.0.weight"])
    common.build_backbone(BACKBONE, small_images=True, weights=str(d / "backbone.pt"))


def test_script_with_both_addons(tmp_path):
    d = tmp_path / "run"
    run_here(
        ["swav.py"]
        + TINY
        + SMALL
        + [
            "--epochs",
            "1",
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
        k in m[-1] and math.isfinite(m[-1][k]) for k in ("loss_qscore", "loss_mask", "loss_cls")
    )
    ckpt = torch.load(d / "checkpoint.pt", weights_only=False)
    assert any(k.startswith("xattn.") for k in ckpt["model"])
    backbone = torch.load(d / "backbone.pt")
    assert not any("xattn" in k or "projector" in k or "prototypes" in k for k in backbone)


def test_torchrun_two_processes(tmp_path):
    d = tmp_path / "run"
    p = torchrun(
        "swav.py",
        TINY
        + SMALL
        + [
            "--epochs",
            "1",
            "--queue-size",
            "64",
            "--queue-start",
            "0",
            "--xattn",
            "--xattn-clusters",
            "8",
            "--run-dir",
            str(d),
        ],
    )
    assert "2 process(es)" in p.stdout
    assert (
        p.stdout.count("SyncBatchNorm needs CUDA") == 1
    )  # global BN is the default; on CPU said once, not refused
    m = read_metrics(d)[0]
    assert m["queue_used"] == pytest.approx(1 / 3)  # same schedule as one process
    knn, n = online_knn_of(d)  # the sharded kNN pass of 2 processes, as one process computes it
    assert abs(read_metrics(d)[0]["knn_top1"] - knn) <= 1 / n
    queue = torch.load(d / "checkpoint.pt", weights_only=False)["queue"]
    assert (
        queue.shape == (2, 64, 32) and (queue.norm(dim=2) > 0.99).all()
    )  # both processes' rows were saved


def test_resume_after_kill_keeps_the_queue_and_ends_with_the_same_weights(tmp_path):
    # the queue is full from step 3 of epoch 1 on: epoch 2 depends on it from its first step
    common_args = (
        TINY
        + SMALL
        + [
            "--epochs",
            "2",
            "--knn-every",
            "0",
            "--queue-size",
            "64",
            "--queue-start",
            "0",
            "--freeze-prototypes-epochs",
            "1",
        ]
    )
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_here(["swav.py"] + common_args + ["--run-dir", str(straight)])
    first = kill_after_first_checkpoint(["swav.py"] + common_args, broken)
    assert (first["queue"].norm(dim=2) > 0.99).all()
    run_here(["swav.py"] + common_args + ["--resume", str(broken)])
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(broken / "checkpoint.pt", weights_only=False)
    assert b["epoch"] == 2 and len(read_metrics(broken)) == 2
    assert torch.equal(a["queue"], b["queue"])  # bitwise on the CPU (README)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # unfrozen in epoch 2, the prototypes moved off their normalized initial values
    init = F.normalize(tiny_model(BACKBONE).state_dict()["prototypes.weight"], dim=1)
    assert torch.allclose(first["model"]["prototypes.weight"], init, atol=1e-6)
    assert not torch.allclose(a["model"]["prototypes.weight"], init, atol=1e-4)


def test_bad_input_is_one_sentence_and_exit_2(tmp_path):
    torch.save(
        {
            "method": "swav",
            "args": {"backbone": "resnet18"},
            "epoch": 1,
            "queue": torch.zeros(2, 64, 4),
        },
        tmp_path / "checkpoint.pt",
    )
    for argv, needle in [
        (["--dataset", "mnist"], "invalid choice"),
        (["--resume", str(tmp_path)], "holds a queue of 64, not --queue-size 3840"),
    ]:
        p = run(["swav.py"] + argv, check=False)
        assert p.returncode == 2, p.stderr
        assert needle in p.stderr and "Traceback" not in p.stderr
        assert (
            needle in p.stderr.strip().splitlines()[-1]
        )  # one sentence, after argparse's usage lines if any
    assert len(p.stderr.strip().splitlines()) == 1  # ours: the sentence alone


def test_bias_and_norm_weights_are_excluded_as_solo_learn_or_not_as_official_swav():
    model = tiny_model()
    one_d = {id(p) for p in model.parameters() if p.ndim == 1}
    groups = common.param_groups(model)  # the CIFAR default, --exclude-bias-norm
    assert (
        {id(p) for p in groups[1]["params"]} == one_d
        and groups[1]["weight_decay"] == 0
        and not groups[1]["lars"]
    )
    assert not one_d & {id(p) for p in groups[0]["params"]}
    (every,) = common.param_groups(
        model, exclude_bias_norm=False
    )  # official: LARC around SGD(model.parameters())
    assert len(every["params"]) == len(list(model.parameters())) and "lars" not in every


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        swav.parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in (
        "--local-crops",
        "--global-scale",
        "--local-scale",
        "--blur-prob",
        "--lars-mode",
        "--exclude-bias-norm",
        "--zero-init-residual",
        "--no-sync-bn",
        "--queue-size",
        "--queue-start",
        "--freeze-prototypes-epochs",
        "--sinkhorn-epsilon",
        "--qscore-lambda",
        "--xattn-positives",
        "--resume",
        "--steps-per-epoch",
    ):
        assert flag in out
