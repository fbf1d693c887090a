"""The report's honesty (issues 34 and 37): mIoU over all N images as Kalibhat et al. Sec. 5, the
random-init kNN reference (measured once, cached, the caller's random state untouched), the page
title, --compare's seed groups (mean and range; "better" only beyond the seed range; machine
numbers never ranked; counts beside rates), constant panels folded and tiny ranges not
stretched. Fast: hand-made arrays and run folders; the only network-free kNN pass is a
resnet18-eighth on 16 px digits."""

import argparse
import json

import numpy as np
import pytest
import torch

import common
import interpret


@pytest.fixture(autouse=True)
def _reference_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEANSSL_CACHE", str(tmp_path / "cleanssl_cache"))


# --- mIoU (issue 34, item 6) ------------------------------------------------------------------
def test_miou_averages_over_all_images_an_empty_heatmap_counting_zero():
    core = np.zeros((4, 4), bool)
    core[:2] = True  # the top half
    heat = np.zeros((4, 4, 4))
    heat[0, :2] = 1.0  # all of its mass inside the core mask: IoU 1
    heat[1, :, :] = 1.0  # half inside: IoU 0.5
    # images 2 and 3: an empty L_i, an all-zero heatmap
    masks = [(core, ~core)] * 4
    num, iou = interpret.miou_scores(heat, masks, np.ones(4, bool))
    assert num["n_images"] == 4 and num["n_blank_heatmaps"] == 2
    assert list(iou["core"]) == [1.0, 0.5, 0.0, 0.0]
    assert num["miou_core_correct"] == pytest.approx((1.0 + 0.5 + 0 + 0) / 4)  # the paper's 1/N
    assert num["miou_spurious_correct"] == pytest.approx((0.0 + 0.5 + 0 + 0) / 4)
    assert num["miou_core_correct_with_heatmap"] == pytest.approx(0.75)  # named, with its share
    assert num["share_with_heatmap_correct"] == 0.5
    assert num["miou_core_misclassified"] is None and num["n_misclassified"] == 0
    # an image without a core mask stays out of the core mean only
    num, _ = interpret.miou_scores(heat[:2], [(core, ~core), (None, ~core)], np.ones(2, bool))
    assert num["miou_core_correct"] == 1.0 and num["miou_spurious_correct"] == 0.25


# --- the random-init reference (issue 37) ------------------------------------------------------
def tiny_args(**kw):
    a = dict(dataset="digits", data_dir="unused", backbone="resnet18-eighth", image_size=16)
    return argparse.Namespace(**{**a, "knn_limit": 64, **kw})


def test_random_init_knn_is_the_seed0_network_measured_once_and_leaves_the_rng(
    tmp_path, monkeypatch
):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    ref = common.random_init_knn(tiny_args(), ks=(20, 200))
    assert torch.equal(torch.get_rng_state(), state)  # a training run's random stream goes on
    assert ref["n_bank"] == 64 and ref["n_test"] == 360 and 0 < ref["knn_top1_k200"] <= 1
    # by hand: build_backbone under seed 0, the kNN bank of 64 training images, the test split
    torch.manual_seed(0)
    net = common.build_backbone("resnet18-eighth", True)
    train = common.make_dataset("digits", "unused", train=True)
    bank = common.knn_bank("digits", "unused", train, 64)
    test = common.make_dataset("digits", "unused", train=False)
    cpu, stats = torch.device("cpu"), common.STATS["digits"]
    fb = common.extract_features(net, bank, 16, stats, 32, cpu, workers=0)
    ft = common.extract_features(net, test, 16, stats, 32, cpu, workers=0)
    assert ref["knn_top1_k20"] == common.knn_top1(*fb, *ft, 10, k=20)
    # cached per protocol: the same call reads the file; another bank is measured anew
    assert (tmp_path / "cleanssl_cache" / "random_init_knn.json").is_file()

    def no_pass(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(common, "extract_features", no_pass)
    assert common.random_init_knn(tiny_args(), ks=(200,))["knn_top1_k200"] == ref["knn_top1_k200"]
    with pytest.raises(AssertionError, match="measured again"):
        common.random_init_knn(tiny_args(knn_limit=32))


def test_verdict_says_in_words_whether_the_backbone_beats_random_init():
    rows = interpret.against_random_init(
        {"knn_top1_k200": 0.5, "knn_top1_k20": 0.6},
        {"knn_top1": (np.array([1.0, 2.0]), np.array([0.3, 0.55]))},
        {
            "offline": {"knn_top1_k20": 0.7, "knn_top1_k200": 0.4, "n_test": 360},
            "online": {"knn_top1_k200": 0.5, "n_test": 360},
        },
    )
    assert [r[0] for r in rows][-1] == "online kNN top-1 (last measured)"
    sentence, ok = interpret.verdict(rows)
    assert ok is None and sentence.startswith("Mixed")
    assert "(+36 of 360 test images)" in sentence and "(-36 of 360 test images)" in sentence
    assert interpret.verdict(rows[:1])[1] is True and interpret.verdict(rows[1:2])[1] is False
    # eval_linear.py's reference holds the same probe of the untrained network: its row first
    rows = interpret.against_random_init(
        {"offline_linear_top1": 0.62, "knn_top1_k200": 0.5},
        {},
        {"offline": {"offline_linear_top1": 0.66, "knn_top1_k200": 0.4, "n_test": 200}},
    )
    assert [r[0] for r in rows] == ["offline linear probe top-1", "offline kNN top-1 (k = 200)"]
    assert (
        "62.0 % against 66.0 % at random init (-8 of 200 test images)" in interpret.verdict(rows)[0]
    )


def test_page_title_names_the_method_and_data_set_not_the_folder():
    assert interpret.page_title({"dataset": "cifar10"}, "simclr", "runs/a") == "SimCLR on cifar10"
    # without checkpoint.pt, a flag only one script has tells the method
    saved = {"dataset": "digits", "moco_version": 3, "seed": 0}
    assert interpret.page_title(saved, "", "runs/a") == "MoCo v3 on digits"
    assert interpret.method_title({"sinkhorn_epsilon": 0.05}) == "SwAV"
    assert interpret.page_title({}, "", "runs/a") == "the run a"


# --- --compare: seed groups, ranking beyond seed noise only, counts ---------------------------
def fake_run(root, name, seed, lr, knn, top1, speed, auroc=None):
    """A run folder as the scripts leave it, without weights: args.json, metrics.jsonl,
    linear.json (and interpret.json)."""
    d = root / name
    d.mkdir()
    args = {**vars(tiny_args()), "seed": seed, "lr": lr, "epochs": 2, "run_dir": str(d)}
    (d / "args.json").write_text(json.dumps(args))
    lines = [
        {"epoch": e, "loss": 5.0 - 0.001 * e, "knn_top1": knn - 0.01 * (2 - e)}
        | {"qscore_under_alpha": 0.25, "bad_images": 0, "images_per_s": speed, "seconds": 60.0}
        for e in (1, 2)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    linear = {
        "offline_linear_top1": top1,
        "n_test": 360,
        "n_train": 64,
        "dataset": "digits",
        "data_dir": "unused",
        "backbone": "resnet18-eighth",
        "image_size": 16,
        "recipe": {"train_limit": 64, "test_limit": 0},
        "classes": [str(c) for c in range(10)],
    }
    (d / "linear.json").write_text(json.dumps(linear))
    if auroc is not None:
        (d / "interpret").mkdir()
        q = {"n": 360, "share_correct": 1 - 15 / 360, "n_misclassified": 15}
        q["auroc_correct_positive"] = auroc
        (d / "interpret" / "interpret.json").write_text(json.dumps({"qscore": q}))
    return str(d)


def row(data, label):
    return next(r for r in data["final"] if r["label"] == label)


def test_compare_groups_seeds_shows_mean_and_range_and_ranks_only_beyond_the_seed_range(tmp_path):
    a = [
        fake_run(tmp_path, f"a{s}", s, 0.1, 0.50 + 0.02 * s, 0.70 + 0.1 * s, 100, 0.5 + 0.1 * s)
        for s in (0, 1)
    ]
    b = [
        fake_run(tmp_path, f"b{s}", s, 0.2, 0.60 + 0.01 * s, 0.75 + 0.03 * s, 900, 0.6 - 0.05 * s)
        for s in (0, 1)
    ]
    out = tmp_path / "cmp"
    interpret.main(interpret.parse_args(["--compare", *a, *b, "--out", str(out)]))
    data = json.loads((out / "compare.json").read_text())
    page = (out / "index.html").read_text()
    assert [(g["runs"], g["seeds"]) for g in data["groups"]] == [
        (["a0", "a1"], [0, 1]),
        (["b0", "b1"], [0, 1]),
    ]
    knn = row(data, "online kNN top-1, last measured")
    assert knn["groups"]["a0 + a1"] == pytest.approx(
        {"mean": 0.51, "min": 0.5, "max": 0.52, "n": 2}
    )
    assert knn["better"] == "b0 + b1"  # 0.60-0.61 against 0.50-0.52: beyond the seed range
    assert knn["counts"]["a0"] == "on 360 test images"
    assert row(data, "offline linear probe, top-1")["better"] is None  # 0.70-0.80 overlaps
    for label in ("training images per second, mean", "training time, all epochs"):
        assert row(data, label)["better"] is None and not row(data, label)["ranked"]
    assert page.count("<b title='better beyond the seed range'>") == 1
    assert "2 seeds: 50.0 % to 52.0 %" in page and "depends on the machine" in page
    # a rate stands beside what it is a share of: the AUROC's mistakes
    assert "on 15 mistakes of 360" in page
    assert row(data, "Q-Score AUROC for the probe's outcome")["better"] is None  # ranges overlap
    # the random-init reference: one row, one dashed line on the kNN panel
    ref = data["runs"][0]["reference"]["online"]["knn_top1_k200"]
    assert row(data, "online kNN top-1 of the random-init backbone")["values"]["b1"] == ref
    assert data["curves"]["knn_top1"]["random init"][0][1] == pytest.approx(100 * ref)
    # constant by construction: not drawn, stated in words
    assert "qscore_under_alpha" not in data["curves"] and "bad_images" not in data["curves"]
    assert "Not drawn, because they are the same in every epoch" in page

    # a group of one seed has no noise estimate: nothing is marked at all
    c = fake_run(tmp_path, "c0", 0, 0.3, 0.9, 0.9, 50)
    out = tmp_path / "cmp2"
    interpret.main(interpret.parse_args(["--compare", *a, *b, c, "--out", str(out)]))
    data = json.loads((out / "compare.json").read_text())
    assert len(data["groups"]) == 3 and all(r["better"] is None for r in data["final"])
    assert "<b title=" not in (out / "index.html").read_text()


def test_tiny_ranges_are_not_stretched_over_the_axis(tmp_path):
    run = {"loss_qscore": (np.array([1.0, 2.0]), np.array([-1.2e-3, -1.22e-3]))}
    run["loss"] = (np.array([1.0, 2.0]), np.array([5.0, 3.0]))
    interpret.training_figure([("r", run)], str(tmp_path / "t.png"))
    import matplotlib.pyplot as plt

    ax = plt.figure().add_subplot()
    interpret.honest_range(ax, [-1.2e-3, -1.22e-3])
    lo, hi = ax.get_ylim()
    assert hi - lo == pytest.approx(interpret.FLOOR * 1.22e-3)  # 2e-5 fills 1/3 of the axis
    assert "all within 2e-05" in ax.texts[0].get_text()
    plt.close("all")


def test_the_curves_start_at_the_kNN_before_the_first_step_and_draw_the_per_step_loss(tmp_path):
    """metrics.jsonl's knn_top1_init is the kNN curve's epoch-0 point (common.Run measures it
    before the first step); steps.jsonl's losses are a panel of their own, each at its step's
    place in its epoch; the random-init value is the reference line, not a panel."""
    lines = [
        {"epoch": 1, "lr": 0.1, "loss": 5.0, "knn_top1_init": 0.30, "knn_top1": 0.35},
        {"epoch": 2, "lr": 0.05, "loss": 4.0, "knn_top1": 0.40, "knn_random_init": 0.3},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    steps = [(1, 2, 5.5), (1, 4, 5.1), (2, 2, 4.4), (2, 4, 3.9)]
    (tmp_path / "steps.jsonl").write_text(
        "".join(
            json.dumps({"epoch": e, "step": s, "it": 0, "loss": v, "lr": 0}) + "\n"
            for e, s, v in steps
        )
        + '{"epoch": 3, "st'  # a line cut short by a kill
    )
    m = interpret.read_metrics(tmp_path)
    assert list(m["knn_top1"][0]) == [0, 1, 2] and list(m["knn_top1"][1]) == [0.30, 0.35, 0.40]
    assert "knn_top1_init" not in m and "knn_random_init" not in m
    assert list(m["loss_step"][0]) == [0.5, 1.0, 1.5, 2.0]
    assert list(m["loss_step"][1]) == [5.5, 5.1, 4.4, 3.9]
    drawn = interpret.training_figure([("run", m)], tmp_path / "t.png")
    assert drawn["loss_step"]["run"] == [[0.5, 5.5], [1.0, 5.1], [1.5, 4.4], [2.0, 3.9]]
    assert drawn["knn_top1"]["run"][0] == [0.0, 30.0]  # in percent, at epoch 0
