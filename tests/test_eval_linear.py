"""eval_linear.py: the probe learns, kNN is common.knn_top1, every output file holds what
interpret.py reads, 2 processes give the features of 1, bad input exits 2."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import eval_linear
from conftest import BACKBONE, TINY, run, torchrun

DIM = common.build_backbone(BACKBONE).dim  # the runs' backbone width (64)

LIMITS = ["--train-limit", "384", "--test-limit", "120", "--workers", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch TINY SimCLR run, then eval_linear.py on it (the files every test reads)."""
    d = tmp_path_factory.mktemp("el") / "run"
    run(["simclr.py"] + TINY + ["--epochs", "1", "--run-dir", str(d)])
    p = run(["eval_linear.py", str(d), "--device", "cpu", "--epochs", "30"] + LIMITS)
    assert "offline linear top-1" in p.stdout
    return d


def blobs(n, d=32, c=4, seed=0):
    """Gaussian clusters around orthogonal means: linearly separable, but not at initialization."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(c, (n,), generator=g)
    x = 3.0 * torch.eye(d)[y] + 0.5 * torch.randn(n, d, generator=g)
    return x, y


def test_probe_learns_separable_features():
    xtr, ytr = blobs(600)
    xte, yte = blobs(200, seed=1)
    head = eval_linear.train_linear(xtr, ytr, 4, epochs=20, batch_size=64, lr=0.1)
    with torch.no_grad():
        assert eval_linear.topk_accuracy(head(xte), yte, 1) > 0.97
    untrained = eval_linear.train_linear(xtr, ytr, 4, epochs=0)  # zero init: every logit equal
    with torch.no_grad():
        assert eval_linear.topk_accuracy(untrained(xte), yte, 1) < 0.5


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    y = torch.tensor([0, 2, 0])
    assert eval_linear.topk_accuracy(logits, y, 1) == pytest.approx(1 / 3)
    assert eval_linear.topk_accuracy(logits, y, 2) == pytest.approx(2 / 3)
    assert eval_linear.topk_accuracy(logits, y, 5) == 1.0  # k capped at the 3 classes


def test_augmented_crops_change_every_draw_and_keep_the_eval_size():
    ds = common.make_dataset("digits", "x", train=True)
    sub = torch.utils.data.Subset(ds, list(range(16)))
    aug = eval_linear.RandomCrops(sub, 16)
    args = (16, common.STATS["digits"], 32, torch.device("cpu"), 16, 0)
    net = common.build_backbone("resnet18", small_images=True).eval()
    torch.manual_seed(0)
    a, y = common.extract_features(net, aug, *args)
    torch.manual_seed(1)
    b, _ = common.extract_features(net, aug, *args)
    plain, y_plain = common.extract_features(net, sub, *args)
    assert a.shape == plain.shape == (16, 512) and torch.equal(y, y_plain)
    assert not torch.allclose(a, b) and not torch.allclose(a, plain)


def test_end_to_end_writes_every_documented_field(trained):
    out = json.loads((trained / "linear.json").read_text())
    for k in ("offline_linear_top1", "offline_linear_top5", "knn_top1_k20", "knn_top1_k200"):
        assert 0.0 <= out[k] <= 1.0
    assert out["offline_linear_top1"] > 0.3  # 10 classes: well above chance after a 1-epoch run
    assert out["offline_linear_top5"] >= out["offline_linear_top1"]
    assert (out["dataset"], out["backbone"], out["n_train"], out["n_test"]) == (
        "digits",
        BACKBONE,
        384,
        120,
    )
    assert (
        out["weights"].endswith("backbone.pt")
        and out["recipe"]["epochs"] == 30
        and out["recipe"]["augment"] == "none"
    )

    p = np.load(trained / "predictions.npz")
    n = 120
    assert {"index", "label", "prediction", "confidence", "correct", "logits", "h"} <= set(p.files)
    assert (
        p["index"].shape == (n,) and np.all(np.diff(p["index"]) > 0) and p["index"].max() < 360
    )  # data-set order
    test_set = common.make_dataset("digits", "x", train=False)
    assert np.array_equal(p["label"], np.array(test_set.targets)[p["index"]])
    assert p["logits"].shape == (n, 10) and p["h"].shape == (n, DIM) and p["h"].dtype == np.float32
    assert p["correct"].dtype == bool and np.array_equal(
        p["correct"], p["prediction"] == p["label"]
    )
    assert np.isclose(p["correct"].mean(), out["offline_linear_top1"])
    assert (p["h"] >= 0).all() and not np.allclose(
        np.linalg.norm(p["h"], axis=1), 1
    )  # pooled ReLU output, not normalized

    # linear_head.pt reproduces the logits, predictions and confidences from h
    saved = torch.load(trained / "linear_head.pt", weights_only=True)
    head = nn.Linear(DIM, 10)
    head.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        logits = head((torch.from_numpy(p["h"]) - saved["mean"]) / saved["std"])
    assert torch.allclose(logits, torch.from_numpy(p["logits"]), atol=1e-4)
    assert np.array_equal(logits.argmax(1).numpy(), p["prediction"])
    assert np.allclose(logits.softmax(1).max(1).values.numpy(), p["confidence"], atol=1e-5)


def test_knn_numbers_are_common_knn_top1_on_the_same_features(trained):
    """Recompute both splits' h from backbone.pt with common.extract_features and the same
    fixed subsets; h must match predictions.npz, and kNN must equal common.knn_top1."""
    out = json.loads((trained / "linear.json").read_text())
    p = np.load(trained / "predictions.npz")
    net = common.build_backbone(BACKBONE, small_images=True, weights=str(trained / "backbone.pt"))
    args = (16, common.STATS["digits"], 32, torch.device("cpu"), 256, 0)
    train_set, _ = eval_linear.fixed_subset(common.eval_dataset("digits", "x"), 384)
    test_set, index = eval_linear.fixed_subset(common.make_dataset("digits", "x", train=False), 120)
    assert np.array_equal(index, p["index"])
    htr, ytr = common.extract_features(net, train_set, *args)
    hte, yte = common.extract_features(net, test_set, *args)
    assert torch.allclose(hte, torch.from_numpy(p["h"]), atol=1e-5)
    for k in (20, 200):
        assert out[f"knn_top1_k{k}"] == common.knn_top1(htr, ytr, hte, yte, 10, k=k, t=0.1)
        # and a kNN written here from its definition (Wu et al. 2018, Sec. 3.4), in numpy
        a = htr.numpy() / np.linalg.norm(htr.numpy(), axis=1, keepdims=True)
        q = hte.numpy() / np.linalg.norm(hte.numpy(), axis=1, keepdims=True)
        sim = q.astype(np.float64) @ a.T.astype(np.float64)  # (120, 384) cosines
        near = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        scores = np.zeros((len(q), 10))
        for i in range(len(q)):
            np.add.at(scores[i], ytr.numpy()[near[i]], np.exp(sim[i, near[i]] / 0.1))
        pred = scores.argmax(1)
        assert abs(out[f"knn_top1_k{k}"] - (pred == yte.numpy()).mean()) <= 2 / len(
            q
        )  # ties, rounding
        assert len(set(pred.tolist())) >= 3  # not one constant class


def test_torchrun_two_processes_give_the_features_of_one(trained, tmp_path):
    """Each process extracts a strided share in eval mode (no batch statistics), all_gather
    joins them in order: h, labels and kNN must be those of the single process, and the
    probe, trained on identical gathered features on every process, the same accuracy; so is
    the random-init reference, measured anew under 2 processes (an empty cache)."""
    torchrun(
        "eval_linear.py",
        [str(trained), "--out", str(tmp_path), "--epochs", "30"] + LIMITS,
        env={"CLEANSSL_CACHE": str(tmp_path / "cache")},
    )
    assert (tmp_path / "cache" / "random_init_probe.json").is_file()
    one, two = np.load(trained / "predictions.npz"), np.load(tmp_path / "predictions.npz")
    assert np.array_equal(one["index"], two["index"]) and np.array_equal(one["label"], two["label"])
    assert np.allclose(one["h"], two["h"], atol=1e-5)
    a, b = (
        json.loads((trained / "linear.json").read_text()),
        json.loads((tmp_path / "linear.json").read_text()),
    )
    assert (a["knn_top1_k20"], a["knn_top1_k200"]) == (b["knn_top1_k20"], b["knn_top1_k200"])
    assert (
        abs(a["offline_linear_top1"] - b["offline_linear_top1"]) <= 1 / 120 + 1e-9
    )  # at most one sample flips
    ra, rb = a["random_init"], b["random_init"]
    assert (ra["knn_top1_k20"], ra["knn_top1_k200"]) == (rb["knn_top1_k20"], rb["knn_top1_k200"])
    assert abs(ra["offline_linear_top1"] - rb["offline_linear_top1"]) <= 1 / 120 + 1e-9


def test_the_reference_is_the_same_probe_of_the_seed0_network_measured_once(
    trained, tmp_path, monkeypatch, capsys
):
    """linear.json's random_init holds the numbers eval_linear.py gives the seed-0 random
    backbone (build_backbone under torch.manual_seed(0)) evaluated as --weights with the same
    flags; the second run of a protocol reads them from $CLEANSSL_CACHE instead of measuring."""
    monkeypatch.setenv("CLEANSSL_CACHE", str(tmp_path / "cache"))
    flags = ["--device", "cpu", "--epochs", "30"] + LIMITS
    first, again = tmp_path / "first", tmp_path / "again"
    assert (
        eval_linear.main(eval_linear.parse_args([str(trained), "--out", str(first)] + flags)) == 0
    )
    said = capsys.readouterr().out
    assert "random-init reference" in said and "random init (the same probe" in said
    # the trained result before the reference's work, the outputs named at the end
    assert said.index("offline linear top-1") < said.index("random-init reference")
    assert said.strip().splitlines()[-1].startswith(f"-> {first}: linear.json")
    ref = json.loads((first / "linear.json").read_text())["random_init"]
    assert (ref["n_train"], ref["n_test"]) == (384, 120) and "epochs 30" in ref["protocol"]

    torch.manual_seed(0)
    torch.save(common.build_backbone(BACKBONE, small_images=True).state_dict(), tmp_path / "r.pt")
    torch.manual_seed(123)  # the reference must not depend on the caller's random state
    plain = ["--weights", str(tmp_path / "r.pt"), "--backbone", BACKBONE, "--dataset", "digits"]
    plain += [
        "--image-size",
        "16",
    ]  # the run's side (TINY), which eval_linear.py reads from args.json
    out = tmp_path / "plain"
    assert (
        eval_linear.main(
            eval_linear.parse_args(plain + ["--out", str(out), "--no-reference"] + flags)
        )
        == 0
    )
    untrained = json.loads((out / "linear.json").read_text())
    assert untrained["random_init"] == {}
    for k in ("offline_linear_top1", "offline_linear_top5", "knn_top1_k20", "knn_top1_k200"):
        assert ref[k] == untrained[k], k

    capsys.readouterr()
    assert (
        eval_linear.main(eval_linear.parse_args([str(trained), "--out", str(again)] + flags)) == 0
    )
    assert "random-init reference:" not in capsys.readouterr().out  # read from the cache
    assert json.loads((again / "linear.json").read_text())["random_init"] == ref


def test_augment_recipe_runs_and_is_recorded(trained, tmp_path):
    args = eval_linear.parse_args(
        [
            str(trained),
            "--augment",
            "--epochs",
            "2",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--train-limit",
            "64",
            "--test-limit",
            "40",
            "--workers",
            "0",
        ]
    )
    assert eval_linear.main(args) == 0
    out = json.loads((tmp_path / "linear.json").read_text())
    assert out["recipe"]["augment"].startswith("random resized crop") and out["n_train"] == 64
    assert np.load(tmp_path / "predictions.npz")["h"].shape == (40, DIM)


def _fails(args, match):
    p = run(["eval_linear.py"] + args, check=False)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip()
    assert (
        err.startswith("error:") and "\n" not in err and "Traceback" not in err and match in err
    ), err


def test_bad_input_exits_2_with_one_sentence(trained, tmp_path):
    empty = tmp_path / "no_backbone"
    empty.mkdir()
    shutil.copy(trained / "args.json", empty / "args.json")
    _fails([str(empty)], "no backbone weights")
    # a 32 px backbone (3x3 stem) cannot take images of 96 px (7x7 stem)
    _fails([str(trained), "--image-size", "96"], "64 px or less")
    # in-process for the rest: the same UserError that main() turns into exit 2
    weird = tmp_path / "weird"
    weird.mkdir()
    shutil.copy(trained / "backbone.pt", weird / "backbone.pt")
    (weird / "args.json").write_text(json.dumps({"dataset": "mnist", "backbone": "resnet18"}))
    with pytest.raises(common.UserError, match="unknown dataset"):
        eval_linear.main(eval_linear.parse_args([str(weird)]))
    with pytest.raises(common.UserError, match="--dataset"):
        eval_linear.main(eval_linear.parse_args(["--weights", str(weird / "backbone.pt")]))
    with pytest.raises(common.UserError, match="resnet50"):
        eval_linear.main(
            eval_linear.parse_args([str(trained), "--backbone", "resnet50", "--out", str(tmp_path)])
        )
    with pytest.raises(common.UserError, match="RUN_DIR"):
        eval_linear.main(eval_linear.parse_args([]))


def test_probe_prints_its_progress_only_when_asked(capsys):
    xtr, ytr = blobs(300)
    eval_linear.train_linear(xtr, ytr, 4, epochs=3, batch_size=64)
    assert capsys.readouterr().out == ""  # no label: silent (tests, library use)
    eval_linear.train_linear(
        xtr, ytr, 4, epochs=3, batch_size=64, progress="linear probe", every=0.0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("  ")[0] for ln in lines] == [f"linear probe: epoch {e}/3" for e in (1, 2, 3)]
    losses = [float(re.search(r"loss (\d+\.\d{4})", ln).group(1)) for ln in lines]
    assert (
        losses[-1] < losses[0] < math.log(4) + 1e-3
    )  # the epoch's mean loss, from ln C at the zero start down
    assert lines[0].endswith(" left") and re.search(r"done in \d+ s$", lines[-1])
    eval_linear.train_linear(
        xtr, ytr, 4, epochs=3, batch_size=64, progress="linear probe"
    )  # every 30 s
    assert len(capsys.readouterr().out.splitlines()) == 1  # a 3-epoch probe: the closing line alone


def test_feature_pass_prints_its_progress_by_time(capsys):
    ds = torch.utils.data.Subset(common.make_dataset("digits", "x", train=True), list(range(40)))
    net = common.build_backbone("resnet18", small_images=True)
    args = (net, ds, 16, common.STATS["digits"], 32, torch.device("cpu"))
    quiet, _ = common.extract_features(*args, batch_size=16, workers=0)
    assert capsys.readouterr().out == ""
    loud, _ = common.extract_features(
        *args, batch_size=16, workers=0, progress="train features", every=0.0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("  ")[0] for ln in lines] == [
        "train features: 16/40 images",
        "train features: 32/40 images",
        "train features: 40/40 images",
    ]
    assert all(re.search(r"  \d+ img/s  \d+ s left$", ln) for ln in lines)
    assert torch.equal(quiet, loud)
