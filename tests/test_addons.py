"""The add-ons as the papers mean them: a Q-Score threshold that picks the batch's low-score
share (also under DDP), a correlation mask that keeps absolute levels, k-means pseudo-labels
that keep their ids across epochs, the attention head's own learning rate, and every script
end to end with both add-ons (what it logs and checkpoints), resume included."""

import pytest
import torch
import torch.nn.functional as F

import common
import simclr
import simsiam
from conftest import TINY, kill_after_first_checkpoint, read_metrics, run_here, spawn


def peaked(n, d=128, seed=0):
    """(n, d) pooled-like features: sparse ReLU powers whose Q-Scores spread out without ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).relu() ** 3 + 1e-3 * torch.rand(n, d, generator=g)


# --- Q-Score threshold --------------------------------------------------------------------
def test_quantile_alpha_selects_the_low_scoring_share():
    h = peaked(64).requires_grad_()
    q = simclr.qscore(h.detach())[0]
    loss, stats = simclr.qscore_regularizer(h, 1.0, 0.2, 3.0, quantile=0.25)
    assert stats["qscore_under_alpha"].item() == 0.25  # 16 of 64 below the 0.25-quantile
    loss.backward()
    touched = h.grad.abs().sum(1) > 0
    assert torch.equal(touched, q < torch.quantile(q, 0.25))  # only the lowest quarter is raised
    # quantile 0: the paper's absolute alpha, as given
    for alpha, share in ((q.sort().values[40].item(), 40 / 64), (q.max().item() + 1, 1.0)):
        assert (
            simclr.qscore_regularizer(h, 1.0, alpha, 3.0, quantile=0.0)[1][
                "qscore_under_alpha"
            ].item()
            == share
        )


def _ddp_qscore(rank, world, h, quantile):
    b = h.shape[0] // world
    part = h[rank * b : (rank + 1) * b].clone().requires_grad_()
    loss, stats = simclr.qscore_regularizer(part, 1.0, 0.2, 3.0, quantile)
    loss.backward()
    return loss.item(), stats["qscore_under_alpha"].item(), part.grad


def test_quantile_alpha_two_processes_equal_one_process():
    """Each process thresholds at the quantile of the gathered global batch, so the mean loss,
    the share under alpha and the DDP-averaged gradient are those of one process."""
    h = peaked(64, seed=3)
    full = h.clone().requires_grad_()
    loss, stats = simclr.qscore_regularizer(full, 1.0, 0.2, 3.0, 0.3)
    loss.backward()
    results = spawn(_ddp_qscore, h, 0.3)
    assert sum(r[0] for r in results) / 2 == pytest.approx(loss.item(), rel=1e-6)
    assert sum(r[1] for r in results) / 2 == pytest.approx(stats["qscore_under_alpha"].item())
    assert torch.allclose(torch.cat([r[2] for r in results]) / 2, full.grad, atol=1e-8)
    assert (
        results[0][1] != results[1][1]
    )  # the halves differ: a per-process quantile would give 0.3 in each


# --- correlation mask ---------------------------------------------------------------------
def test_correlation_mask_keeps_absolute_levels():
    """Eq. 3's dot product over one scale for the whole batch: an image whose positive matches
    weakly (the same channels at 1/100 of the magnitude) gets a mask near 0 beside an image
    whose positive matches strongly; a per-image scale, or the cosine, would lift it to 1."""
    g = torch.Generator().manual_seed(0)
    d = 64
    anchor = torch.zeros(2, d, 4, 4)
    anchor[:, : d // 2] = torch.rand(2, d // 2, 4, 4, generator=g)  # post-ReLU-like, channels 0-31
    noise = 0.01 * torch.rand(2, d, 4, 4, generator=g)
    matching = anchor.flip(2, 3) * 5 + noise  # the same parts elsewhere, brighter
    weak = anchor.flip(2, 3) / 100  # the same parts, faint
    unrelated = torch.zeros(2, d, 4, 4)
    unrelated[:, d // 2 :] = torch.rand(2, d // 2, 4, 4, generator=g)  # nothing in common
    pair = torch.stack([matching[0], weak[1]])[:, None]  # image 0: a strong match, 1: a faint one
    mu = simclr.correlation_mask(anchor, pair)
    assert mu[0].amax() == 1 and mu[1].amax() < 0.01  # muted, as Eq. 3 gives it
    assert simclr.correlation_mask(anchor, pair, "cosine")[1].amin() > 0.9  # the cosine: not
    assert simclr.correlation_mask(anchor, unrelated[:, None]).amax() == 0
    # Eq. 4: the mean over the positives; an unrelated positive adds 0 to the sum, so it halves
    # the raw mean, and the batch scale (half as large too) leaves mu as the match alone gives it
    mu_match = simclr.correlation_mask(anchor, matching[:, None])
    both = simclr.correlation_mask(anchor, torch.stack([matching, unrelated], 1))
    assert torch.allclose(both, mu_match)
    assert ((0 <= both) & (both <= 1)).all()
    # float32 with autocast off: bf16 autocast on the CPU would otherwise run the einsum in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu_auto = simclr.correlation_mask(anchor.bfloat16(), matching[:, None].bfloat16())
    assert mu_auto.dtype == torch.float32
    assert torch.equal(
        mu_auto,
        simclr.correlation_mask(anchor.bfloat16().float(), matching[:, None].bfloat16().float()),
    )


def _ddp_mask(rank, world, fs, fp):
    b = fs.shape[0] // world
    return simclr.correlation_mask(fs[rank * b : (rank + 1) * b], fp[rank * b : (rank + 1) * b])


def test_correlation_mask_scale_is_the_global_batchs_under_ddp():
    """Two processes, one holding the strong matches and the other the faint ones: each divides
    by the largest value of the whole batch, so together they give one process's mask."""
    g = torch.Generator().manual_seed(1)
    fs = torch.rand(4, 16, 3, 3, generator=g)
    fp = fs.flip(2, 3)[:, None] * torch.tensor([1.0, 1.0, 0.1, 0.1]).view(4, 1, 1, 1, 1)
    parts = spawn(_ddp_mask, fs, fp)
    assert torch.allclose(torch.cat(parts), simclr.correlation_mask(fs, fp), atol=1e-6)
    assert torch.cat(parts)[2:].amax() < 0.2  # process 1 alone would have scaled its own to 1


# --- pseudo-labels across epochs ------------------------------------------------------------
def planted_bank(noise=0.05, seed=0, n_per=30, k=6, d=16):
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(k, d)  # far apart, so that every seeding finds the same clusters
    x = F.normalize(
        centers.repeat_interleave(n_per, 0) + noise * torch.randn(k * n_per, d, generator=g), dim=1
    )
    bank = common.MemoryBank(k * n_per, d, "cpu")
    bank.z.copy_(x)
    return bank


def same_partition(a, b):
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_warm_start_keeps_cluster_ids():
    bank = planted_bank()
    labels, centroids = bank.kmeans(6, seed=1)  # epoch e
    warm, _ = bank.kmeans(6, seed=2, init=centroids)  # epoch e + 1, same embeddings
    assert torch.equal(warm, labels)
    cold, _ = bank.kmeans(6, seed=3)  # re-seeded: the same clusters, numbered anew
    assert same_partition(cold, labels) and (cold == labels).float().mean() < 0.5
    # embeddings that moved a little keep their ids too
    bank.z.copy_(
        F.normalize(
            bank.z + 0.01 * torch.randn(bank.z.shape, generator=torch.Generator().manual_seed(5)),
            dim=1,
        )
    )
    assert torch.equal(bank.kmeans(6, seed=3, init=centroids)[0], labels)
    with pytest.raises(common.UserError, match="xattn-clusters"):
        bank.kmeans(5, init=centroids)


# --- the attention head's parameter group -------------------------------------------------------
def test_xattn_groups_give_the_head_its_own_scaled_groups():
    args = simclr.parse_args(
        ["--proj-hidden", "64", "--proj-dim", "32", "--xattn", "--xattn-clusters", "4"]
    )
    model = simclr.SimCLR(args, small_images=True)
    groups = simclr.xattn_groups(common.param_groups(model), model, 0.01)
    head = {id(p) for p in model.xattn.parameters()}
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each parameter once
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= head if "lr_scale" in g else not ids & head
    scaled = [g for g in groups if "lr_scale" in g]
    assert len(scaled) == 2 and all(g["lr_scale"] == 0.01 for g in scaled)
    assert {g.get("lars", True) for g in scaled} == {
        True,
        False,
    }  # the head's bias keeps no decay and no LARS
    # SimSiam: the fixed-lr predictor group is left alone; the loop's rule gives the head lr * scale
    args = simsiam.parse_args(
        [
            "--proj-hidden",
            "64",
            "--proj-dim",
            "32",
            "--pred-hidden",
            "16",
            "--xattn",
            "--xattn-clusters",
            "4",
        ]
    )
    model = simsiam.SimSiam(args, small_images=True)
    groups = simsiam.xattn_groups(
        simsiam.param_groups(model, 1e-4, True), model, args.xattn_lr_scale
    )
    assert [(g["fix_lr"], "lr_scale" in g) for g in groups] == [
        (False, False),
        (False, True),
        (True, False),
    ]
    assert args.xattn_lr_scale == pytest.approx(0.03 / 3.6)


# --- every script end to end ---------------------------------------------------------------------
FAST = {
    "simclr.py": ["--proj-hidden", "64", "--proj-dim", "32"],
    "moco.py": [
        "--proj-hidden",
        "64",
        "--pred-hidden",
        "64",
        "--proj-dim",
        "32",
        "--queue-size",
        "64",
    ],
    "byol.py": ["--proj-hidden", "64", "--pred-hidden", "64", "--proj-dim", "32"],
    "simsiam.py": ["--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "16"],
    "swav.py": [
        "--local-crops",
        "2",
        "--prototypes",
        "30",
        "--proj-hidden",
        "64",
        "--proj-dim",
        "32",
    ],
    "dino.py": [
        "--local-crops",
        "2",
        "--proj-hidden",
        "64",
        "--proj-dim",
        "32",
        "--prototypes",
        "128",
    ],
}


@pytest.mark.parametrize("script", list(FAST))
def test_script_logs_the_quantile_share_scales_the_head_lr_and_saves_centroids(script, tmp_path):
    d = tmp_path / "run"
    run_here(
        [script]
        + TINY
        + FAST[script]
        + [
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--knn-every",
            "0",
            "--qscore-lambda",
            "0.1",
            "--xattn",
            "--xattn-clusters",
            "8",
            "--run-dir",
            str(d),
        ]
    )
    m = read_metrics(d)[0]
    assert m["qscore_under_alpha"] == pytest.approx(
        0.25, abs=0.02
    )  # the default --qscore-alpha-quantile
    assert 0 <= m["qscore_empty"] <= 1
    ckpt = torch.load(d / "checkpoint.pt", weights_only=False)
    groups = ckpt["optimizer"]["param_groups"]
    head = [g for g in groups if "lr_scale" in g]
    core = [g for g in groups if "lr_scale" not in g and not g.get("fix_lr")]
    assert (
        sum(len(g["params"]) for g in head) == 4
    )  # the 1x1 conv and the classifier, weights and biases
    assert core[0]["lr"] > 0
    for g in head:
        assert g["lr"] == pytest.approx(0.03 / 3.6 * core[0]["lr"], rel=1e-9)
    assert ckpt["centroids"].shape == (
        8,
        32,
    )  # the memory bank's z: projections of width --proj-dim


# Two epochs of simclr with --xattn, unbroken, on one thread: the run that a killed, a stopped and
# a re-clustering run are held against (made once for the three tests).
XATTN_2 = (
    ["simclr.py"]
    + TINY
    + FAST["simclr.py"]
    + ["--epochs", "2", "--knn-every", "0", "--xattn", "--xattn-clusters", "8"]
)
ONE = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def xattn_straight(tmp_path_factory):
    d = tmp_path_factory.mktemp("xattn") / "straight"
    run_here(XATTN_2 + ["--run-dir", str(d)], env=ONE)
    return d


def test_resume_with_xattn_ends_where_an_unbroken_run_does(xattn_straight, tmp_path):
    """The next epoch's k-means starts from the checkpoint's centroids, as in the unbroken run."""
    broken = tmp_path / "broken"
    kill_after_first_checkpoint(XATTN_2, broken, env=ONE)
    run_here(XATTN_2 + ["--resume", str(broken)], env=ONE)
    a = torch.load(xattn_straight / "checkpoint.pt", weights_only=False)
    b = torch.load(broken / "checkpoint.pt", weights_only=False)
    assert b["epoch"] == 2 and torch.equal(a["centroids"], b["centroids"])  # bitwise on the CPU
    assert torch.equal(a["pseudo_labels"], b["pseudo_labels"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_cluster_every_n_epochs_keeps_the_labels_in_between(xattn_straight, tmp_path):
    """--xattn-cluster-every 2: epoch 1 trains on epoch 0's clustering (the centroids and labels a
    1-epoch run ends with); with the default 1, epoch 1 clusters again, from moved embeddings."""
    ck = {}
    for name, extra in {
        "one": ["--epochs", "1"],
        "every2": ["--xattn-cluster-every", "2"],
    }.items():
        run_here(XATTN_2 + extra + ["--run-dir", str(tmp_path / name)], env=ONE)
        ck[name] = torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)
    ck["every1"] = torch.load(xattn_straight / "checkpoint.pt", weights_only=False)
    assert ck["one"]["pseudo_labels"].shape == (
        len(common.make_dataset("digits", "x", train=True)),
    )  # one per image
    assert torch.equal(ck["every2"]["centroids"], ck["one"]["centroids"])
    assert torch.equal(ck["every2"]["pseudo_labels"], ck["one"]["pseudo_labels"])
    assert not torch.allclose(ck["every1"]["centroids"], ck["one"]["centroids"], atol=1e-4)


def test_cluster_every_takes_whole_numbers_of_at_least_one(tmp_path):
    for bad in ("0", "-1", "1.5"):
        p = run_here(
            ["simclr.py"]
            + TINY
            + ["--xattn", "--xattn-cluster-every", bad, "--run-dir", str(tmp_path)],
            check=False,
        )
        assert p.returncode == 2 and f"'{bad}' is not a whole number of at least 1" in p.stderr


def test_memory_bank_pass_reports_its_progress(monkeypatch, capsys):
    """Each clustering embeds the whole training set (1.28M images on ImageNet): it prints progress
    lines (common.extract_features, by time), labelled."""
    ds = torch.utils.data.Subset(common.make_dataset("digits", "x", train=True), list(range(48)))
    net = common.build_backbone("resnet18-eighth", small_images=True)
    real = common.extract_features
    monkeypatch.setattr(common, "extract_features", lambda *a, **k: real(*a, **{**k, "every": 0.0}))
    labels, centroids = common.cluster(
        net,
        lambda m, x: m(x)[1],
        ds,
        16,
        common.STATS["digits"],
        32,
        torch.device("cpu"),
        4,
        seed=0,
        workers=0,
        data_path="cpu",
        precision="fp32",
    )
    assert labels.shape == (48,) and centroids.shape[0] == 4
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines
        and all(ln.startswith("xattn memory bank: ") for ln in lines)
        and "48/48 images" in lines[-1]
    )


def test_xattn_stopped_mid_epoch_resumes_with_that_epochs_labels(xattn_straight, tmp_path):
    """A SIGTERM inside epoch 2, then the same command: the resumed part of epoch 2 trains on the
    labels of epoch 2's clustering (from the checkpoint), not on a clustering of the weights at the
    stop, so the run ends bit for bit where the unbroken one does."""
    from test_fault_tolerance import assert_same_state, load, stop_with_sigterm

    broken = tmp_path / "broken"
    code, out = stop_with_sigterm(XATTN_2 + ["--run-dir", str(broken)], at="2:2")
    assert code == common.EXIT_STOPPED, out
    assert out.strip().splitlines()[-1].startswith("stopped by SIGTERM at epoch 2 step 2/3; "), out
    mid = load(broken / "checkpoint.pt")
    assert mid["epoch"] == 1 and mid["at"]["step"] == 2 and mid["pseudo_labels"] is not None
    p = run_here(XATTN_2 + ["--run-dir", str(broken)], env=ONE)
    assert f"resuming {broken} at epoch 2 step 2\n" in p.stdout
    a, b = load(xattn_straight / "checkpoint.pt"), load(broken / "checkpoint.pt")
    assert torch.equal(a["pseudo_labels"], b["pseudo_labels"]) and torch.equal(
        a["centroids"], b["centroids"]
    )
    assert_same_state(a, b)
