"""interpret.py: Q-Score against simclr.qscore, AUROC/AUPRC against scikit-learn, A_j and the
percentile band, soft IoU, AD/AI on a toy model, the whole pipeline end to end, the page a person
reads (captions, readable names), --compare on two runs, bad input."""

import html
import html.parser
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

import common
import interpret
import simclr
from conftest import REPO, TINY, read_metrics, run


def test_qscore_agrees_with_simclr():
    g = torch.Generator().manual_seed(0)
    h = torch.cat(
        [
            torch.randn(64, 128, generator=g).relu() ** 3,  # sparse, like pooled ReLU features
            torch.randn(32, 128, generator=g),
            torch.rand(8, 128, generator=g) * 0.01 + 1.0,
        ]
    )  # near-flat rows: L_i empty at eps 3
    for eps in (3.0, 1.0):
        q_ref, m_ref = simclr.qscore(h, eps)
        q, m = interpret.qscore(h.numpy(), eps)
        assert np.array_equal(m, m_ref.numpy())
        assert np.allclose(q, q_ref.numpy(), atol=1e-6)
    assert (
        interpret.qscore(h.numpy())[1][-8:].sum(1) == 0
    ).all()  # an empty L_i stays empty: |L_i| = 0


def test_auroc_auprc_match_sklearn_in_both_directions():
    rng = np.random.RandomState(0)
    correct = rng.rand(500) < 0.7
    q = np.round(rng.randn(500) + 0.8 * correct, 1)  # planted signal, rounded so that scores tie
    for score, positive in ((q, correct), (-q, ~correct)):
        c = interpret.binary_curves(score, positive)
        assert c["auroc"] == pytest.approx(roc_auc_score(positive, score), abs=1e-12)
        assert c["auprc"] == pytest.approx(average_precision_score(positive, score), abs=1e-12)
        assert c["auroc"] > 0.65  # the planted signal is found in both directions
    assert interpret.binary_curves(np.arange(6.0), np.arange(6) >= 3)["auroc"] == 1.0
    assert interpret.binary_curves(np.arange(6.0), np.arange(6) < 3)["auroc"] == 0.0
    assert (
        interpret.binary_curves(np.arange(4.0), np.ones(4, bool))["auroc"] is None
    )  # one kind only


def test_activation_share_and_percentile_band_on_hand_made_sets():
    # 20 samples, 25 features: feature j is highly activating for the first j samples (j < 20),
    # so A_j = 5 j %; features 20-24 never are and stay out of the percentiles.
    mask = np.zeros((20, 25), bool)
    for j in range(20):
        mask[:j, j] = True
    a = interpret.activation_share(mask)
    assert np.allclose(a, [5.0 * j for j in range(20)] + [0] * 5)
    # A over the 19 active features is 5, 10, ..., 95: the 30th percentile is 32, the 85th 81.5
    assert list(interpret.discriminative_band(a)) == list(range(7, 17))
    assert set(interpret.discriminative_subset(a, 10)) == set(range(7, 17))
    assert set(interpret.discriminative_subset(a, 4)) == {10, 11, 12, 13}  # centred on the band
    assert set(interpret.discriminative_subset(a, 25)) == set(range(25))
    assert list(interpret.discriminative_band(a, 0, 100)) == list(range(1, 20))


def test_soft_iou_known_answers():
    heat = np.array([[1.0, 0.5], [0.0, 0.5]])
    core = np.array([[1, 0], [1, 0]], bool)
    # Ar = the three non-zero pixels; Ar ∩ M holds 1.0 of heat, Ar ∪ M all 2.0 of it
    assert interpret.soft_iou(heat, core) == pytest.approx(0.5)
    assert interpret.soft_iou(heat, np.ones((2, 2), bool)) == pytest.approx(1.0)
    assert interpret.soft_iou(heat, ~np.ones((2, 2), bool)) == 0.0
    assert interpret.soft_iou(np.zeros((2, 2)), core) == 0.0  # no heatmap: no overlap
    batch = interpret.soft_iou(np.stack([heat, heat]), np.stack([core, ~core]))
    assert np.allclose(batch, [0.5, 0.5])


def test_average_drop_and_increase_known_answers():
    ad, ai = interpret.average_drop_increase([0.5, 0.8, 0.2, 0.4], [0.25, 0.9, 0.2, 0.1])
    assert ad == pytest.approx(100 * (0.5 + 0 + 0 + 0.75) / 4) and ai == pytest.approx(25.0)


class Toy(nn.Module):
    """A 'backbone' whose feature map is the image itself: f = x (3 channels), h = its mean."""

    def __init__(self):
        super().__init__()
        self.one = nn.Parameter(torch.ones(()))

    def forward(self, x):
        f = self.one * x
        return f, f.mean(dim=(2, 3))


def test_explanation_scores_on_a_toy_model_are_eq8_and_grad_campp():
    g = torch.Generator().manual_seed(0)
    stats = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    x = torch.randn(4, 3, 5, 5, generator=g)
    labels = torch.tensor([0, 1, 1, 0])
    head = nn.Linear(3, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, -1.0, 0.5], [-1.0, 1.0, 3.0]]))
        head.bias.copy_(torch.tensor([0.1, -0.2]))
    mean, std = torch.tensor([0.1, -0.1, 0.0]), torch.tensor([0.5, 2.0, 1.0])
    y, o, cam, explained = interpret.explanation_scores(Toy(), head, mean, std, x, labels, stats)
    # Eq. 8 by hand: CAM = ReLU(sum_j alpha_j^c f_j), alpha^c = W_c / std
    # (the head sees standardized h)
    alpha = (head.weight / std)[labels]  # (4, 3)
    want = torch.relu((alpha[:, :, None, None] * x).sum(1))
    want = want / want.flatten(1).max(1).values[:, None, None]
    assert torch.allclose(cam, want, atol=1e-5)
    m, s = torch.tensor(stats[0]).view(1, 3, 1, 1), torch.tensor(stats[1]).view(1, 3, 1, 1)
    want_x = ((x * s + m) * want[:, None] - m) / s
    assert torch.allclose(explained, want_x, atol=1e-5)
    prob = lambda im: head((im.mean(dim=(2, 3)) - mean) / std).softmax(1)[torch.arange(4), labels]
    assert torch.allclose(y, prob(x), atol=1e-6) and torch.allclose(o, prob(want_x), atol=1e-5)
    ad, ai = interpret.average_drop_increase(y.detach().numpy(), o.detach().numpy())
    yy, oo = prob(x).detach().numpy(), prob(want_x).detach().numpy()
    assert ad == pytest.approx(100 * np.mean(np.maximum(0, yy - oo) / yy), rel=1e-4)
    assert ai == pytest.approx(100 * np.mean(oo > yy))


# --- end to end ------------------------------------------------------------------------
def write_digit_masks(folder, n=24):
    """Salient-ImageNet-layout masks for the first n digits test images at their original
    32 px: core = the digit's strokes, spurious = the background."""
    ds = common.make_dataset("digits", "unused", train=False)
    with open(os.path.join(folder, "features.csv"), "w") as fh:
        fh.write("class,feature,kind\n")
        for c in ds.classes:
            fh.write(f"{c},1,core\n{c},2,spurious\n")
    for i in range(n):
        strokes = ds.data[i][..., 0] > 128  # (32, 32)
        for feat, m in ((1, strokes), (2, ~strokes)):
            d = os.path.join(folder, ds.classes[ds.targets[i]], f"feature_{feat}")
            os.makedirs(d, exist_ok=True)
            Image.fromarray((m * 255).astype(np.uint8)).save(os.path.join(d, f"{i}.png"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """TINY SimCLR for 1 epoch, then eval_linear.py: a run folder with predictions."""
    run_dir = str(tmp_path_factory.mktemp("run") / "simclr")
    run(["simclr.py"] + TINY + ["--epochs", "1", "--knn-every", "0", "--run-dir", run_dir])
    assert os.path.exists(os.path.join(REPO, "eval_linear.py"))
    run(["eval_linear.py", run_dir, "--epochs", "2", "--train-limit", "320", "--workers", "0"])
    return run_dir


def test_end_to_end_every_file_and_an_html_page_of_existing_files(trained, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    write_digit_masks(str(masks))
    out = tmp_path / "interp"
    p = run(
        ["interpret.py", trained, "--out", str(out), "--masks", str(masks), "--max-images", "32"]
    )
    report = json.loads((out / "interpret.json").read_text())
    for name in interpret.SECTIONS:
        assert name in report and f"] {name}: " in p.stdout
        for f in report[name]["figures"]:
            assert (out / f).stat().st_size > 1000  # a real PNG
    assert len(report["miou"]["figures"]) == 1 and report["miou"]["n_images"] == 24
    page = (out / "index.html").read_text()
    refs = re.findall(r"src='([^']+)'", page)
    assert (
        len(refs) == 9 and all((out / r).is_file() for r in refs) and refs[0] == "training.png"
    )  # curves on top
    assert_readable_page(page, keys_of(report) | set(read_metrics(trained)[0]))
    assert (
        0 <= report["qscore"]["auroc_correct_positive"] <= 1
        and "offline_linear_top1" in report["run"]
    )
    # |L_i| from Eq. 2's own sets: the share of empty ones is reported, and they count 0 in the
    # means
    q = report["qscore"]
    assert 0 <= q["share_empty_L"] <= 1 and "images with an empty L<sub>i</sub>" in page
    share = q["share_correct"]
    parts = [(share, q["share_empty_L_correct"]), (1 - share, q["share_empty_L_misclassified"])]
    assert q["share_empty_L"] == pytest.approx(sum(w * v for w, v in parts if v is not None))
    # mIoU over all N (Sec. 5): an image without a heatmap counts 0, so the paper's mean is the
    # mean over images with a heatmap times their share; the restricted mean comes with its share
    m = report["miou"]
    assert m["n_blank_heatmaps"] >= 0 and m["n_correct"] + m["n_misclassified"] == 24
    for k in ("miou_core_correct", "miou_spurious_correct"):
        assert 0 <= m[k] <= 1
        assert m[k] == pytest.approx(m["share_with_heatmap_correct"] * m[f"{k}_with_heatmap"])
    text = html.unescape(page)
    assert "the paper's mIoU" in text and "only images with a heatmap" in text
    # the terminal: a short summary in words, no raw keys, no time for a skipped section
    assert "share_empty_L" not in p.stdout and "seconds" not in p.stdout
    assert "mIoU over all 24 images" in p.stdout
    # the reference: the random-init kNN, same protocol, beside the trained one and in words
    ref = report["reference"]
    assert set(ref) == {"online", "offline"} and ref["offline"]["n_bank"] == 320
    assert report["run"]["random_init_knn_top1_k200"] == ref["offline"]["knn_top1_k200"]
    # eval_linear.py's own reference, the same probe of the untrained network: a row and a verdict
    lin = json.loads(open(os.path.join(trained, "linear.json")).read())
    assert ref["offline"] == lin["random_init"]
    assert (
        report["run"]["random_init_offline_linear_top1"]
        == lin["random_init"]["offline_linear_top1"]
    )
    assert "offline linear probe, top-1, of the random-init backbone" in page
    assert "offline linear probe top-1: " in " ".join(p.stdout.split())  # wrapped lines
    assert "offline kNN top-1, k = 200, of the random-init backbone" in page
    assert "Does the backbone beat its random initialization?" in page
    assert re.search(r"<div class='verdict (yes|no|mixed)'><b>(Yes|No|Mixed)", page)
    assert "random init" in p.stdout
    # the title: the method and data set from args.json, not the folder's name
    assert "<h1>SimCLR on digits: what the backbone learned</h1>" in page
    assert "<title>SimCLR on digits" in page
    assert 0 <= report["adai"]["average_drop"] <= 100 and report["adai"]["n_images"] == 32
    # a section run alone rewrites its own numbers and keeps the others'
    (out / "adai.png").unlink()
    interpret.main(
        interpret.parse_args([trained, "--out", str(out), "--only", "qscore", "--eps", "2"])
    )
    again = json.loads((out / "interpret.json").read_text())
    assert again["run"]["eps"] == 2 and again["adai"] == report["adai"]
    assert (
        again["qscore"]["mean_L_correct"] > report["qscore"]["mean_L_correct"]
    )  # a lower eps admits more features
    assert "adai.png" not in (out / "index.html").read_text()  # only files that exist


# --- the page as a person reads it ---------------------------------------------------------
class Page(html.parser.HTMLParser):
    """The visible text of a page, and each image with the tags around it and its figure's
    caption."""

    def __init__(self, text):
        super().__init__()
        self.open, self.text, self.images, self.captions, self.caption = [], [], [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append((dict(attrs)["src"], list(self.open)))
        elif tag not in ("meta", "br"):
            self.open.append(tag)
        if tag == "figcaption":
            self.caption = []

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self.captions.append(" ".join(self.caption))
            self.caption = None
        if tag in self.open:
            del self.open[len(self.open) - 1 - self.open[::-1].index(tag) :]

    def handle_data(self, data):
        if "style" not in self.open:
            self.text.append(data)
            if self.caption is not None:
                self.caption.append(data)


def keys_of(d):
    """Every key of a JSON report, nested dicts and lists of dicts included."""
    if isinstance(d, dict):
        return set(d) | {k for v in d.values() for k in keys_of(v)}
    if isinstance(d, list):
        return {k for v in d for k in keys_of(v)}
    return set()


def assert_readable_page(text, keys):
    """Each image sits in a <figure> whose caption is sentences, one caption per figure; no
    snake_case key of the JSON outputs is shown as a label."""
    page = Page(text)
    assert page.images and len(page.captions) == len(page.images)
    for src, around in page.images:
        assert "figure" in around, f"{src} is not inside a <figure>"
    for caption in page.captions:
        assert len(caption.split()) >= 30 and caption.count(". ") >= 2 and caption.endswith("."), (
            caption
        )
    visible = " ".join(page.text)
    shown = [
        k for k in keys if "_" in k and re.search(rf"(?<![\w/-]){re.escape(k)}(?![\w-])", visible)
    ]
    assert not shown, f"raw keys on the page: {shown}"


@pytest.fixture(scope="module")
def regularized(tmp_path_factory):
    """A second TINY SimCLR run, 2 epochs with the Q-Score regularizer and one online kNN, whose
    metrics.jsonl then gains a key no label knows and a line cut short (a killed write)."""
    run_dir = str(tmp_path_factory.mktemp("run") / "simclr_qscore")
    run(
        ["simclr.py"]
        + TINY
        + ["--epochs", "2", "--knn-every", "2", "--qscore-lambda", "0.1", "--run-dir", run_dir]
    )
    rows = read_metrics(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as fh:
        for r in rows:
            fh.write(json.dumps({**r, "teacher_spread_x": 0.5 * r["epoch"]}) + "\n")
        fh.write('{"epoch": 3, "loss": 4.')
    return run_dir


def whole_lines(run_dir):
    """The lines of metrics.jsonl that parse (the fixture cut the last one short)."""
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def test_compare_two_runs_one_page_with_both_curves(trained, regularized, tmp_path):
    out = tmp_path / "cmp"
    assert (
        interpret.main(interpret.parse_args(["--compare", trained, regularized, "--out", str(out)]))
        == 0
    )
    page = (out / "index.html").read_text()
    data = json.loads((out / "compare.json").read_text())
    names = [r["label"] for r in data["runs"]]
    assert names == ["simclr", "simclr_qscore"] and all(n in page for n in names)
    # what the figure drew, read back from its lines: in the loss panel one line per run, each
    # with its own epochs and the values of its metrics.jsonl
    loss = data["curves"]["loss"]
    assert {n: [x for x, _ in pts] for n, pts in loss.items()} == {
        "simclr": [1.0],
        "simclr_qscore": [1.0, 2.0],
    }
    for n, d in zip(names, (trained, regularized)):
        assert [y for _, y in loss[n]] == pytest.approx([r["loss"] for r in whole_lines(d)])
    assert sorted(data["curves"]["collapse_std"]) == names
    assert list(data["curves"]["loss_qscore"]) == ["simclr_qscore"]  # a term only one run has
    # measured before the first step (epoch 0) and at the last epoch only, drawn in percent
    init, knn = (
        whole_lines(regularized)[0]["knn_top1_init"],
        whole_lines(regularized)[1]["knn_top1"],
    )
    assert data["curves"]["knn_top1"]["simclr_qscore"] == [
        [0.0, pytest.approx(100 * init)],
        [2.0, pytest.approx(100 * knn)],
    ]
    # the random-init kNN of the same protocol (both runs are TINY's), a dashed line on the panel
    ref = 100 * data["runs"][1]["reference"]["online"]["knn_top1_k200"]
    assert data["curves"]["knn_top1"]["random init"] == [[0.0, ref], [1.0, ref]]
    assert data["runs"][0]["reference"]["online"] == data["runs"][1]["reference"]["online"]
    assert data["curves"]["teacher_spread_x"]["simclr_qscore"] == [
        [1.0, 0.5],
        [2.0, 1.0],
    ]  # an unknown key, drawn
    assert "teacher spread x" in page  # ... and named in words
    # the final numbers: the linear probe of the run that has one, a dash for the other
    lin = json.loads(open(os.path.join(trained, "linear.json")).read())
    top1 = next(r for r in data["final"] if r["label"] == "offline linear probe, top-1")
    assert top1["values"] == {"simclr": lin["offline_linear_top1"], "simclr_qscore": None}
    assert f"{100 * lin['offline_linear_top1']:.1f} %" in page and "--qscore-lambda 0.1" in page
    assert_readable_page(
        page, set(whole_lines(regularized)[0]) | {"run_dir", "offline_linear_top1"}
    )


def test_bad_input_one_sentence_exit_2(trained, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    for name in ("args.json", "predictions.npz", "linear.json"):
        (empty / name).write_bytes(open(os.path.join(trained, name), "rb").read())
    p = run(["interpret.py", str(empty)], check=False)
    assert (
        p.returncode == 2 and "no backbone" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    )
    # no predictions yet
    (empty / "predictions.npz").unlink()
    (empty / "backbone.pt").write_bytes(open(os.path.join(trained, "backbone.pt"), "rb").read())
    with pytest.raises(common.UserError, match="run eval_linear.py"):
        interpret.main(interpret.parse_args([str(empty)]))
    # a data set the backbone cannot take: 96 px images need the 7x7 stem, this one has the 3x3
    with pytest.raises(common.UserError, match="does not hold resnet18-eighth weights"):
        interpret.main(
            interpret.parse_args([trained, "--image-size", "96", "--out", str(tmp_path / "o")])
        )
    # predictions of another data set
    with pytest.raises(common.UserError, match="does not describe"):
        interpret.main(
            interpret.parse_args(
                [
                    trained,
                    "--dataset",
                    "folder",
                    "--data-dir",
                    str(make_folder(tmp_path)),
                    "--image-size",
                    "16",
                    "--out",
                    str(tmp_path / "o"),
                ]
            )
        )
    # masks whose size matches neither the image (32 px) nor what the model sees (16 px)
    masks = tmp_path / "masks"
    (masks / "3" / "feature_1").mkdir(parents=True)
    (masks / "features.csv").write_text("class,feature,kind\n3,1,core\n")
    ds = common.make_dataset("digits", "unused", train=False)
    i = ds.targets.index(3)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(masks / "3" / "feature_1" / f"{i}.png")
    with pytest.raises(common.UserError, match="20x20 px, but its image is 32x32"):
        interpret.main(
            interpret.parse_args(
                [trained, "--only", "miou", "--masks", str(masks), "--out", str(tmp_path / "o")]
            )
        )
    with pytest.raises(common.UserError, match="choose among"):
        interpret.main(interpret.parse_args([trained, "--only", "qscore,saliency"]))
    # --compare: a folder that is not there, and one that is not a run; no run at all
    with pytest.raises(common.UserError, match="'.*nowhere' does not exist"):
        interpret.main(interpret.parse_args(["--compare", trained, str(tmp_path / "nowhere")]))
    with pytest.raises(common.UserError, match="neither metrics.jsonl nor linear.json"):
        interpret.main(
            interpret.parse_args(["--compare", trained, str(masks), "--out", str(tmp_path / "c")])
        )
    with pytest.raises(common.UserError, match="name a run folder"):
        interpret.main(interpret.parse_args([]))


def make_folder(tmp_path):
    """An ImageFolder with 2 classes and 3 test images: not the split the predictions describe."""
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for k in range(3):
                Image.fromarray(np.full((16, 16, 3), 40 * k, np.uint8)).save(
                    root / split / c / f"{k}.png"
                )
    return root
