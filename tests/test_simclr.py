"""simclr.py: NT-Xent against Eq. (1), its distributed form, the add-ons, and the script end to
end."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import common
import simclr
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


def slow_nt_xent(z1, z2, t):
    """Eq. (1) of Chen et al. 2020 written out: z_{2k-1}, z_{2k} are the two views of image k,
    l(i, j) = -log exp(s_ij / t) / sum_{k != i} exp(s_ik / t),
    L = 1/2N sum_k [l(2k-1, 2k) + l(2k, 2k-1)]."""
    n = z1.shape[0]
    z = torch.stack([z1, z2], 1).reshape(2 * n, -1)  # interleaved: 0,1 are image 0's views
    total = 0.0
    for i in range(2 * n):
        j = i + 1 if i % 2 == 0 else i - 1
        sim = lambda a, b: F.cosine_similarity(z[a], z[b], dim=0) / t
        denom = sum(torch.exp(sim(i, k)) for k in range(2 * n) if k != i)
        total = total - torch.log(torch.exp(sim(i, j)) / denom)
    return total / (2 * n)


def test_nt_xent_matches_equation_1():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    assert torch.allclose(simclr.nt_xent_loss(z1, z2, 0.5), slow_nt_xent(z1, z2, 0.5), atol=1e-5)
    # identical views far apart from the rest give a small loss
    e = torch.eye(6, 8) * 10
    assert simclr.nt_xent_loss(e, e, 0.1) < 1e-3


def _ddp_nt_xent(rank, world, z1, z2, t):
    b = z1.shape[0] // world
    a1 = z1[rank * b : (rank + 1) * b].clone().requires_grad_()
    a2 = z2[rank * b : (rank + 1) * b].clone().requires_grad_()
    loss = simclr.nt_xent_loss(a1, a2, t)
    loss.backward()
    return loss.item(), a1.grad, a2.grad


def test_nt_xent_two_processes_equal_one_process():
    """Each process returns the mean over its own 2b anchors; DDP averages gradients over
    processes, so: mean of the losses == the global loss, and grad_r / world == the global
    loss's gradient w.r.t. rank r's rows (negatives from the other process included)."""
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    full1, full2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = simclr.nt_xent_loss(full1, full2, 0.2)
    loss.backward()
    results = spawn(_ddp_nt_xent, z1, z2, 0.2)
    assert math.isclose(sum(r[0] for r in results) / 2, loss.item(), rel_tol=1e-5)
    g1 = torch.cat([r[1] for r in results]) / 2
    g2 = torch.cat([r[2] for r in results]) / 2
    assert torch.allclose(g1, full1.grad, atol=1e-6) and torch.allclose(g2, full2.grad, atol=1e-6)


def test_qscore_on_hand_made_vectors():
    # after L2-normalization: row 0 has one feature far above the rest, row 1 is flat (empty L_i)
    h = torch.tensor([[10.0] + [1.0] * 19, [1.0] * 20])
    q, mask = simclr.qscore(h, eps=3.0)
    hn = F.normalize(h, dim=1)
    assert mask[0].nonzero().flatten().tolist() == [0]
    assert math.isclose(q[0].item(), (hn[0, 0] - hn[0].mean()).item(), rel_tol=1e-5)
    assert mask[1].sum() == 0  # an empty L_i counts 0; Q falls back to the single largest feature
    assert math.isclose(q[1].item(), 0.0, abs_tol=1e-6)
    # two highly activating features: Q is the mean of their deviations
    h2 = torch.tensor([[9.0, 7.0] + [0.5] * 38])
    q2, m2 = simclr.qscore(h2)
    hn2 = F.normalize(h2, dim=1)
    assert m2[0, :2].all() and m2[0].sum() == 2
    assert math.isclose(q2[0].item(), (hn2[0, :2] - hn2[0].mean()).mean().item(), rel_tol=1e-5)
    # the empty case still has a gradient
    h3 = torch.ones(1, 20).requires_grad_()
    simclr.qscore(h3 + torch.arange(20.0) * 1e-3)[0].sum().backward()
    assert h3.grad.abs().sum() > 0


def test_qscore_regularizer_raises_low_scores_and_leaves_high_ones():
    g = torch.Generator().manual_seed(0)
    low = torch.rand(4, 64, generator=g) + 1.0  # flat: low Q
    high = torch.cat(
        [torch.full((4, 1), 30.0), torch.rand(4, 63, generator=g)], 1
    )  # peaked: high Q
    h = torch.cat([low, high]).requires_grad_()
    q0, _ = simclr.qscore(h.detach())
    alpha = (q0[:4].max() + q0[4:].min()).item() / 2
    assert (q0[:4] < alpha).all() and (q0[4:] > alpha).all()
    loss, stats = simclr.qscore_regularizer(h, lam=1.0, alpha=alpha)
    assert math.isclose(stats["qscore_under_alpha"].item(), 0.5)
    opt = torch.optim.SGD([h], lr=1.0)
    loss.backward()
    opt.step()
    q1, _ = simclr.qscore(h.detach())
    assert (q1[:4] > q0[:4]).all()
    assert torch.equal(h.detach()[4:], high)  # no gradient reached samples above alpha
    assert simclr.qscore_regularizer(h, 0.0, alpha)[0] == 0


def test_correlation_mask_known_answer():
    # anchor: location (0, 0) holds the shared feature (length 2), (1, 0) an orthogonal one; the
    # positives hold the shared one at (1, 1) and at (0, 1), at lengths 1 and 0.5
    fs = torch.zeros(1, 4, 2, 2)
    fs[0, :, 0, 0] = torch.tensor([1.0, 0, 0, 0]) * 2
    fs[0, :, 1, 0] = torch.tensor([0.0, 1, 0, 0])
    fp = torch.zeros(1, 2, 4, 2, 2)
    fp[0, 0, :, 1, 1] = torch.tensor([1.0, 0, 0, 0])
    fp[0, 1, :, 0, 1] = torch.tensor([0.5, 0, 0, 0])
    # Eq. 3: rho(0, 0) = max dot / D = 2/4 and 1/4 for the two positives, Eq. 4: their mean 0.375;
    # every other position 0; then over the batch's largest value, 0.375
    mu = simclr.correlation_mask(fs, fp)
    assert torch.allclose(mu, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))
    assert not mu.requires_grad
    # a second image, the first at a tenth of the magnitude (its positives too): Eq. 3's dot
    # product is 100 times smaller, and one scale for the batch keeps it so (never per image)
    two = simclr.correlation_mask(torch.cat([fs, fs / 10]), torch.cat([fp, fp / 10]))
    assert torch.allclose(two[0], mu[0]) and torch.allclose(two[1], mu[0] / 100)
    # the cosine form (a departure) puts both images on one scale: 1 at (0, 0) in each
    cos = simclr.correlation_mask(torch.cat([fs, fs / 10]), torch.cat([fp, fp / 10]), "cosine")
    assert torch.allclose(cos, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]).expand(2, 2, 2))
    fs2 = torch.rand(3, 8, 4, 4, requires_grad=True)
    for form in ("eq3", "cosine"):
        mu2 = simclr.correlation_mask(fs2, torch.rand(3, 2, 8, 4, 4), form)
        assert mu2.shape == (3, 4, 4) and mu2.min() >= 0 and mu2.max() <= 1
        assert not mu2.requires_grad


def test_correlation_mask_mutes_a_weak_position_as_eq3_does():
    """Issue 34's measure: one position of the anchor scaled by 1e-3. Eq. 3's dot product falls
    with it (mu there about 1e-3 of the others'); the cosine leaves it where it was."""
    g = torch.Generator().manual_seed(0)
    fs = torch.rand(1, 32, 4, 4, generator=g)  # post-ReLU-like: all channels positive
    fp = fs.flip(2, 3)[:, None] + 0.05 * torch.rand(1, 1, 32, 4, 4, generator=g)
    weak = fs.clone()
    weak[0, :, 2, 1] *= 1e-3
    eq3, cos = simclr.correlation_mask(weak, fp), simclr.correlation_mask(weak, fp, "cosine")
    others = torch.ones(4, 4, dtype=torch.bool)
    others[2, 1] = False
    assert eq3[0, 2, 1] < 1e-2 * eq3[0][others].min()
    assert cos[0, 2, 1] > 0.5 * cos[0][others].min()


def test_cross_attention_head_and_losses():
    head = simclr.CrossAttentionHead(16, clusters=5, temperature=0.05)
    f = torch.rand(2 + 2 * 3, 16, 4, 4, requires_grad=True)  # 2 anchors, 3 positives each
    beta, logits = head(f)
    assert beta.shape == (8, 1, 4, 4) and logits.shape == (8, 5)
    assert ((beta > 0) & (beta < 1)).all()
    lm, lc = simclr.xattn_losses(f, beta, logits, torch.tensor([1, 4]), positives=3)
    (lm + lc).backward()
    assert lm.item() >= 0 and lc.item() > 0 and f.grad.abs().sum() > 0


def test_the_three_projector_forms():
    """--projector: solo-learn's head (the default: Linear -> ReLU -> Linear, biases, no BN), the
    official one (bias-free Linears, BN after each, z's BN scaling without a shift) and lightly's
    (the same with a learned shift); only the trainable parameters reach the optimizer."""
    kinds = lambda m: [type(x).__name__ for x in m.projector]
    tiny = ["--backbone", "resnet18-eighth", "--proj-hidden", "32", "--proj-dim", "16"]
    solo = simclr.SimCLR(simclr.parse_args(tiny), True)
    assert kinds(solo) == ["Linear", "ReLU", "Linear"]
    assert all(x.bias is not None for x in solo.projector if isinstance(x, torch.nn.Linear))
    for form in ("official", "lightly"):
        model = simclr.SimCLR(simclr.parse_args(tiny + ["--projector", form]), True)
        assert kinds(model) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
        assert model.projector[0].bias is None and model.projector[3].bias is None
        z_bn = model.projector[-1]
        assert z_bn.bias.requires_grad == (form == "lightly")  # official: center=False
        trained = {id(p) for g in common.param_groups(model) for p in g["params"]}
        assert (id(z_bn.bias) in trained) == (form == "lightly")
        model.train()
        z = model([torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)])["z"]  # (16, 16)
        assert z.shape == (16, 16) and z.mean(0).abs().max() < 1e-5  # centred per dimension
        assert torch.allclose(z.var(0, unbiased=False), torch.ones(16), atol=1e-2)
        if form == "official":  # a step moves the scale but never the shift
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
            simclr.nt_xent_loss(z[:8], z[8:]).backward()
            opt.step()
            assert torch.equal(z_bn.bias, torch.zeros(16))
            assert not torch.equal(z_bn.weight, torch.ones(16))


def test_one_sgd_step_lowers_the_loss():
    """The model's outputs with and without positives, then one SGD step on a fixed batch
    lowers NT-Xent plus both add-on terms (the loss the script minimizes) on that batch."""
    args = simclr.parse_args(
        [
            "--proj-hidden",
            "64",
            "--proj-dim",
            "32",
            "--xattn",
            "--xattn-clusters",
            "4",
            "--qscore-lambda",
            "0.1",
            "--backbone",
            BACKBONE,
        ]
    )
    torch.manual_seed(0)
    model = simclr.SimCLR(args, small_images=True)
    x1, x2, pos = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    assert "f" not in model([x1, x2])  # no positives: no add-on work
    out = model([x1, x2], pos)
    assert out["f"].shape[0] == 16 and out["logits"].shape == (16, 4)
    pseudo = common.PseudoLabels({"pseudo_labels": torch.arange(8) % 4}, torch.device("cpu"))
    idx = torch.arange(8)

    def loss_of(out):
        ssl = simclr.nt_xent_loss(out["z"][:8], out["z"][8:], args.temperature)
        loss, terms, _ = simclr.addon_losses(args, out, ssl, pseudo, idx)
        assert set(terms) == {"loss_ssl", "loss_qscore", "loss_mask", "loss_cls"}
        return loss

    # lr 0.01: with the BN-free default head (--projector solo-learn) a step of 0.05 overshoots
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = loss_of(model([x1, x2], pos))
    opt.zero_grad()
    before.backward()
    opt.step()
    after = loss_of(model([x1, x2], pos))
    assert after.item() < before.item() - 1e-3, (before.item(), after.item())


def test_script_trains_and_writes_the_run(tmp_path):
    d = tmp_path / "run"
    # milder views than the recipe's (strength 1.0 and blur on 16 px digits), so that 4 steps an
    # epoch show the loss fall
    p = run_here(
        ["simclr.py"]
        + TINY
        + [
            "--epochs",
            "2",
            "--steps-per-epoch",
            "4",
            "--warmup-epochs",
            "0",
            "--lr",
            "1.0",
            "--jitter-strength",
            "0.5",
            "--blur-prob",
            "0",
            "--run-dir",
            str(d),
        ]
    )
    assert "img/s" in p.stdout and "online-knn" in p.stdout
    m = read_metrics(d)
    assert [r["epoch"] for r in m] == [1, 2]
    assert m[1]["loss"] < m[0]["loss"]
    for k in (
        "loss_ssl",
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
        assert k in m[0]
    assert {"args.json", "metrics.jsonl", "checkpoint.pt", "backbone.pt"} <= set(os.listdir(d))
    import common

    common.build_backbone(BACKBONE, small_images=True, weights=str(d / "backbone.pt"))


def test_script_with_both_addons(tmp_path):
    d = tmp_path / "run"
    run_here(
        ["simclr.py"]
        + TINY
        + [
            "--epochs",
            "2",
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
    assert all(k in m[-1] for k in ("loss_qscore", "loss_mask", "loss_cls"))
    ckpt = torch.load(d / "checkpoint.pt", weights_only=False)
    assert any(k.startswith("xattn.") for k in ckpt["model"])
    backbone = torch.load(d / "backbone.pt")
    assert not any("xattn" in k or "projector" in k for k in backbone)  # the head is dropped


def test_torchrun_two_processes(tmp_path):
    d = tmp_path / "run"
    p = torchrun(
        "simclr.py",
        TINY + ["--epochs", "1", "--xattn", "--xattn-clusters", "8", "--run-dir", str(d)],
    )
    assert "2 process(es)" in p.stdout
    assert (
        p.stdout.count("SyncBatchNorm needs CUDA") == 1
    )  # global BN is the default; on CPU said once, not refused
    knn, n = online_knn_of(d)  # the sharded kNN pass of 2 processes, as one process computes it
    assert abs(read_metrics(d)[0]["knn_top1"] - knn) <= 1 / n


def test_resume_after_kill_ends_with_the_same_weights(tmp_path):
    common_args = TINY + ["--epochs", "2", "--knn-every", "0"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_here(["simclr.py"] + common_args + ["--run-dir", str(straight)])
    # start the same run, kill it as soon as epoch 1's checkpoint is written, then resume
    kill_after_first_checkpoint(["simclr.py"] + common_args, broken)
    run_here(["simclr.py"] + common_args + ["--resume", str(broken)])
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(broken / "checkpoint.pt", weights_only=False)
    assert b["epoch"] == 2
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k
    assert len(read_metrics(broken)) == 2


@pytest.mark.parametrize(
    "argv,env,needle",
    [
        (["--dataset", "mnist"], {}, "invalid choice"),
        (["--dataset", "folder", "--data-dir", "/nonexistent"], {}, "does not exist"),
        (["--batch-size", "33"], {"WORLD_SIZE": "2", "RANK": "0"}, "not divisible"),
        (["--resume", "/nonexistent/run"], {}, "no checkpoint"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(argv, env, needle):
    p = run(["simclr.py"] + argv, env=env, check=False)
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]  # argparse prints its usage above the sentence
    assert "error:" in last and needle in last and "Traceback" not in p.stderr


def test_checkpoint_of_another_method_is_refused(tmp_path):
    torch.save(
        {"method": "moco", "args": {"backbone": "resnet18"}, "epoch": 1}, tmp_path / "checkpoint.pt"
    )
    p = run_here(["simclr.py", "--resume", str(tmp_path)], check=False)
    assert (
        p.returncode == 2
        and "moco checkpoint, not simclr" in p.stderr
        and "Traceback" not in p.stderr
    )
    torch.save(
        {"method": "simclr", "args": {"backbone": "resnet50"}, "epoch": 1},
        tmp_path / "checkpoint.pt",
    )
    p = run_here(["simclr.py", "--resume", str(tmp_path)], check=False)
    assert p.returncode == 2 and "resnet50" in p.stderr


def test_non_finite_loss_stops_with_the_step(tmp_path):
    d = tmp_path / "run"
    p = run_here(
        ["simclr.py"]
        + TINY
        + ["--epochs", "2", "--lr", "1e38", "--warmup-epochs", "0", "--run-dir", str(d)],
        check=False,
    )
    assert p.returncode == 1
    assert "non-finite at epoch 1, step" in p.stdout
    assert not (d / "checkpoint.pt").exists()  # nothing written after the loss went bad


def test_help_documents_every_flag():
    p = run(["simclr.py", "--help"])
    for flag in ("--qscore-lambda", "--xattn-positives", "--resume", "--steps-per-epoch"):
        assert flag in p.stdout
