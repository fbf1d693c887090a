"""What did a self-supervised backbone learn, and why does its linear probe fail where it fails?

Reads a run folder (backbone.pt, args.json) and what eval_linear.py wrote (predictions.npz,
linear_head.pt, linear.json), and writes figures (PNG), interpret.json and an index.html that
shows every figure with a caption (what it shows, the paper's figure it follows, how to read it)
and every number with its name, below the run's training curves (metrics.jsonl). Six sections,
each of which can run alone (--only):

  qscore          Q-Score as a label-free predictor of correct classification: AUROC, AUPRC
                  (correct as positive, and mis-classified as positive), ROC and PR curves;
                  mean |L_i| and confidence of correct vs mis-classified samples (the
                  measures of Fig. 5, split by outcome). Kalibhat et al., "Understanding
                  Representation Quality in Self-Supervised Models" (the Q-Score paper),
                  Sec. 4, Fig. 4.
  features        mean representations of correct vs mis-classified samples per class (Fig. 3).
  discriminative  A_j, the share of samples for which feature j is highly activating (Eq. 5),
                  the 30th-85th percentile band (Fig. A.1); linear accuracy of the band and of
                  bands of other sizes against random features and PCA (Fig. A.3).
  gradcam         Grad-CAM of each image's highly activating features (the sum over L_i,
                  Fig. 6); chosen features: class histogram and top activating images (Fig. 2).
  miou            soft IoU of those heatmaps with core and spurious masks (Sec. 5).
  adai            Average Drop and Average Increase of class explanation maps (Seyfi et al.,
                  spatial cross-attention, Sec. 3.4, Eq. 8; definitions of Grad-CAM++).

    python simclr.py --dataset digits --epochs 1 --run-dir runs/demo
    python eval_linear.py runs/demo
    python interpret.py runs/demo                          # -> runs/demo/interpret/index.html
    python interpret.py runs/demo --only qscore,discriminative
    python interpret.py --compare runs/base runs/qscore --out runs/cmp  # -> runs/cmp/index.html

--compare draws the training curves of several runs on shared axes (one panel per quantity of
metrics.jsonl, one colour per run) and tabulates their final numbers, from metrics.jsonl,
linear.json and interpret/interpret.json where these exist; compare.json holds the same.

Masks (--masks DIR) follow the Salient ImageNet layout (Singla & Feizi 2022):
    DIR/features.csv
        header `class,feature,kind`, kind: core | spurious
    DIR/<class>/feature_<k>/<image>.<JPEG|jpg|png>
        grayscale, 0-255, one mask per (class, feature)
<class> is the class's name in the data set (the folder name for ImageFolder, e.g. an ImageNet
wnid); <image> is the image's file name without extension for ImageFolder data sets and its
index in the evaluation split otherwise. An image's core (spurious) mask is the pixel-wise max
of its core (spurious) feature masks, kept where > 0.5. A mask has the size the model sees
(--image-size square) or the image's original size (then it is resized and cropped as the
image is). Salient ImageNet's discover_spurious_features.csv maps to features.csv by writing,
for each annotated (class_index, feature_index), the class's wnid, the feature and its verdict.
"""

import argparse
import csv
import html
import json
import os
import re
import time

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image

import common

SECTIONS = ("qscore", "features", "discriminative", "gradcam", "miou", "adai")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "run_dir",
        nargs="?",
        default="",
        help="run folder of a method script (backbone.pt, args.json)",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="RUN",
        help="instead: draw these runs' training curves on shared axes "
        "with a table of their final numbers",
    )
    p.add_argument(
        "--predictions", default="", help="folder of eval_linear.py's outputs (default: RUN_DIR)"
    )
    p.add_argument(
        "--out",
        default="",
        help="output folder (default: RUN_DIR/interpret; with --compare, runs/compare_<time>)",
    )
    p.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections: {','.join(SECTIONS)}"
    )
    p.add_argument(
        "--masks",
        default="",
        help="core/spurious masks in the Salient ImageNet layout (see above); miou needs it",
    )
    p.add_argument(
        "--max-images",
        type=int,
        default=256,
        help="images that gradcam, miou and adai run the backbone on",
    )
    p.add_argument(
        "--features",
        default="",
        help="features to show in gradcam, e.g. 12,301; default: 4 picked from the band",
    )
    p.add_argument(
        "--eps",
        type=float,
        default=3.0,
        help="highly activating: h_ij > mu_i + eps sigma_i (Eq. 2; paper: 3)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        choices=common.DATASETS,
        help="default: linear.json, else args.json",
    )
    p.add_argument("--data-dir", default=None, help="default: linear.json, else args.json")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="default: linear.json, else args.json; 0: native",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: cuda when there is one",
    )
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the random-init reference (the kNN of the untrained architecture, measured "
        "once per protocol and cached in $CLEANSSL_CACHE, default ~/.cache/cleanssl)",
    )
    return p.parse_args(argv)


# --- the measures: small pure functions --------------------------------------------------
def qscore(h, eps=3.0):
    """Q-Score (Kalibhat et al., Eq. 2 and 3), in numpy; the same definition as the method
    scripts' `qscore`. h (N, D) pooled representations, L2-normalized here.
    L_i = {j : h_ij > mu_i + eps sigma_i} (population std); Q_i = mean_{j in L_i} (h_ij - mu_i);
    for Q alone an empty L_i becomes the single largest feature (the regularizer's fallback).
    Returns Q (N,) and the mask of L (N, D) as Eq. 2 gives it: an empty L_i is all False, so
    |L_i| = 0 and it adds nothing to A_j."""
    h = np.asarray(h, dtype=np.float32)
    h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
    mu, sigma = h.mean(1, keepdims=True), h.std(1, keepdims=True)  # (N, 1)
    mask = h > mu + eps * sigma
    used, empty = mask.copy(), ~mask.any(1)
    used[empty, h[empty].argmax(1)] = True
    q = ((h - mu) * used).sum(1) / used.sum(1)
    return q, mask


def binary_curves(score, positive):
    """ROC and precision-recall curves of `score` as a predictor of `positive` (bool), with
    AUROC (trapezoids under the ROC; tied scores count one half) and AUPRC as average
    precision, AP = sum_n (R_n - R_{n-1}) P_n over the distinct thresholds (the definition
    scikit-learn uses). None for the areas when only one kind of sample exists."""
    score, positive = np.asarray(score, np.float64), np.asarray(positive, bool)
    order = np.argsort(-score, kind="mergesort")
    s, y = score[order], positive[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last row of each distinct threshold
    tp = np.cumsum(y)[last].astype(np.float64)
    fp = last + 1 - tp
    n_pos, n_neg = tp[-1], fp[-1]
    if n_pos == 0 or n_neg == 0:
        return {"auroc": None, "auprc": None, "fpr": [], "tpr": [], "precision": [], "recall": []}
    tpr, fpr = np.r_[0.0, tp / n_pos], np.r_[0.0, fp / n_neg]
    precision, recall = tp / (tp + fp), tp / n_pos
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    auprc = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return {
        "auroc": auroc,
        "auprc": auprc,
        "fpr": fpr,
        "tpr": tpr,
        "precision": precision,
        "recall": recall,
    }


def activation_share(mask):
    """A_j = 100/N sum_i 1{j in L_i} (Q-Score paper, Eq. 5): percent of samples for which
    feature j is highly activating. mask (N, D) bool -> (D,)."""
    return 100.0 * np.asarray(mask, np.float64).mean(0)


def discriminative_band(a, lo=30.0, hi=85.0):
    """Discriminative features (App. A.1): among the features highly activating for at least
    one sample, those whose A_j lies between the lo-th and hi-th percentile of A over them.
    Features active for few samples are image-specific, those active for most are generic.
    Returns their indices, in ascending A."""
    active = np.nonzero(a > 0)[0]
    a_lo, a_hi = np.percentile(a[active], [lo, hi])
    band = active[(a[active] >= a_lo) & (a[active] <= a_hi)]
    return band[np.argsort(a[band], kind="stable")]


def discriminative_subset(a, k, lo=30.0, hi=85.0):
    """k features whose A_j ranks are centred on the band's (Fig. A.3's "subsets of various
    sizes" from the middle of Fig. A.1); k = the band's size gives the band itself."""
    order = np.argsort(a, kind="stable")  # ascending A
    rank = np.empty_like(order)
    rank[order] = np.arange(len(a))
    centre = rank[discriminative_band(a, lo, hi)].mean()
    start = int(np.clip(round(centre - (k - 1) / 2), 0, len(a) - k))
    return order[start : start + k]


def soft_iou(heat, mask):
    """Soft IoU of the Q-Score paper, Sec. 5: s(Ar ∩ M) / s(Ar ∪ M), Ar = {heat > 0} the
    heatmap's area, M the mask's, and s(.) the sum of the heatmap's values over an area.
    As s weighs pixels by the heatmap, mask pixels outside Ar add nothing: the score is the
    share of the heatmap's mass inside the mask. heat (..., H, W) >= 0, mask (..., H, W) bool."""
    heat, mask = np.asarray(heat, np.float64), np.asarray(mask, bool)
    area = heat > 0
    inter = (heat * (area & mask)).sum((-2, -1))
    union = (heat * (area | mask)).sum((-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1e-300), 0.0)


def average_drop_increase(y, o):
    """Average Drop and Average Increase (Chattopadhay et al. 2018, Grad-CAM++; Seyfi et al.
    Sec. 3.4): y (N,) the score of the class on the image, o (N,) on its explanation map.
    AD = 100/N sum_i max(0, y_i - o_i) / y_i (lower is better);
    AI = 100/N sum_i 1{o_i > y_i} (higher is better)."""
    y, o = np.asarray(y, np.float64), np.asarray(o, np.float64)
    return float(100 * np.mean(np.maximum(0.0, y - o) / y)), float(100 * np.mean(o > y))


def explanation_scores(backbone, head, mean, std, x, labels, stats):
    """CAM of the labelled class (Seyfi et al. Eq. 8) and the class's softmax score on the image
    (Y) and on its explanation map (O): the image, in pixel space, times the up-sampled CAM
    normalized to [0, 1]. With a linear head on average-pooled features, Grad-CAM's weights
    are W_cj / (std_j HW), so common.grad_cam is Eq. 8 with alpha_j^c = W_cj / std_j (the
    1/HW scale is removed by the normalization). x (B, 3, H, W) normalized with `stats`."""
    rows = torch.arange(len(x), device=x.device)

    def class_logit(h):  # (B, D) -> (B,)
        return head((h - mean) / std)[rows, labels]

    def score(images):
        with torch.no_grad():
            return head((backbone(images)[1] - mean) / std).softmax(1)[rows, labels]

    cam = common.grad_cam(backbone, x, class_logit)  # (B, H, W) in [0, 1]
    m, s = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in stats)
    explained = ((x * s + m) * cam[:, None] - m) / s  # dim the image where the class is not seen
    return score(x), score(explained), cam, explained


# --- inputs ---------------------------------------------------------------------------
def load_inputs(args):
    """Everything the sections read, checked before any work; bad input raises UserError."""
    if not os.path.isdir(args.run_dir):
        raise common.UserError(f"run folder '{args.run_dir}' does not exist.")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown or not only:
        raise common.UserError(f"--only {args.only}: choose among {','.join(SECTIONS)}.")
    weights = os.path.join(args.run_dir, "backbone.pt")
    if not os.path.isfile(weights):
        raise common.UserError(
            f"no backbone at '{weights}': "
            f"'{args.run_dir}' is not a finished run of a method script."
        )
    pred_dir = args.predictions or args.run_dir
    path = os.path.join(pred_dir, "predictions.npz")
    if not os.path.isfile(path):
        raise common.UserError(
            f"no predictions at '{path}': run eval_linear.py {args.run_dir} first."
        )
    linear = {}
    if os.path.isfile(os.path.join(pred_dir, "linear.json")):
        with open(os.path.join(pred_dir, "linear.json")) as fh:
            linear = json.load(fh)
    saved = {}
    if os.path.isfile(os.path.join(args.run_dir, "args.json")):
        with open(os.path.join(args.run_dir, "args.json")) as fh:
            saved = json.load(fh)
    for key, default in (("dataset", None), ("data_dir", "data"), ("image_size", 0)):
        if getattr(args, key) is None:
            setattr(args, key, linear.get(key, saved.get(key, default)))
    if args.dataset is None:
        raise common.UserError(
            "neither linear.json nor args.json names the data set: pass --dataset."
        )
    if args.masks and not os.path.isfile(os.path.join(args.masks, "features.csv")):
        raise common.UserError(
            f"--masks '{args.masks}' has no features.csv (the layout is in interpret.py --help)."
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise common.UserError("--device cuda was asked for, but no GPU is visible.")

    p = dict(np.load(path))
    native = common.IMAGE_SIZE[args.dataset]
    size = args.image_size or native
    name = linear.get("backbone", saved.get("backbone", "resnet18"))
    backbone = common.build_backbone(
        name, size <= 64, weights
    )  # a stem that does not fit the size fails here
    if p["h"].shape[1] != backbone.dim:
        raise common.UserError(
            f"'{path}' holds {p['h'].shape[1]}-wide representations, but the {name} gives "
            f"{backbone.dim}: run eval_linear.py {args.run_dir} again."
        )
    dataset = common.make_dataset(args.dataset, args.data_dir, train=False, download=False)
    targets = np.asarray(dataset.targets)
    if p["index"].max() >= len(dataset) or not np.array_equal(targets[p["index"]], p["label"]):
        raise common.UserError(
            f"'{path}' does not describe the evaluation split of {args.dataset} at "
            f"'{args.data_dir}' ({len(dataset)} images): run eval_linear.py on it first."
        )
    head_path = os.path.join(pred_dir, "linear_head.pt")
    head, head_mean, head_std, d = None, None, None, backbone.dim
    if "adai" in only:
        if not os.path.isfile(head_path):
            raise common.UserError(
                f"adai needs the linear head at '{head_path}': run eval_linear.py first."
            )
        saved_head = torch.load(head_path, map_location="cpu", weights_only=True)
        w = saved_head["state_dict"]["weight"]
        if w.shape != (len(dataset.classes), backbone.dim):
            raise common.UserError(
                f"'{head_path}' maps {w.shape[1]} features to {w.shape[0]} classes, but the "
                f"backbone gives {backbone.dim} and {args.dataset} has {len(dataset.classes)} "
                "classes."
            )
        head = nn.Linear(w.shape[1], w.shape[0])
        head.load_state_dict(saved_head["state_dict"])
        head_mean = torch.zeros(d) if saved_head.get("mean") is None else saved_head["mean"].float()
        head_std = torch.ones(d) if saved_head.get("std") is None else saved_head["std"].float()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    q, mask = qscore(p["h"], args.eps)
    return dict(
        only=only,
        eps=args.eps,
        p=p,
        q=q,
        mask=mask,
        a=activation_share(mask),
        linear=linear,
        backbone=backbone.to(device).eval(),
        head=head,
        head_mean=head_mean,
        head_std=head_std,
        dataset=dataset,
        classes=[str(c) for c in dataset.classes],
        size=size,
        native=native,
        stats=common.STATS[args.dataset],
        device=device,
        out=args.out or os.path.join(args.run_dir, "interpret"),
    )


def load_images(ctx, rows):
    """The eval-transformed images of prediction rows `rows`: (B, 3, s, s) on the device."""
    tf = common.eval_transform(ctx["size"], ctx["stats"], ctx["native"])
    idx = ctx["p"]["index"][rows]
    return torch.stack([tf(ctx["dataset"][int(i)][0].convert("RGB")) for i in idx]).to(
        ctx["device"]
    )


def sample_rows(ctx, max_images):
    """A fixed random choice (seed 0) of at most max_images prediction rows, in random order, so
    that the figures' first images mix classes (ImageFolder data sets are sorted by class)."""
    return np.random.RandomState(0).permutation(len(ctx["q"]))[:max_images]


def heatmaps_of_l(ctx, rows, batch=64):
    """Grad-CAM of the sum of each image's highly activating features (L_i from the backbone's
    h on these very images), (B, s, s) numpy; all 0 for an image whose L_i is empty."""
    out = []
    for s in range(0, len(rows), batch):
        x = load_images(ctx, rows[s : s + batch])
        with torch.no_grad():
            h = ctx["backbone"](x)[1]
        l_mask = torch.as_tensor(qscore(h.cpu().numpy(), ctx["eps"])[1], device=x.device)
        out.append(common.grad_cam(ctx["backbone"], x, l_mask).cpu().numpy())
    return np.concatenate(out)


def to_rgb(ctx, x):
    m, s = (np.array(v).reshape(3, 1, 1) for v in ctx["stats"])
    return np.clip(x.cpu().numpy() * s + m, 0, 1).transpose(1, 2, 0)  # (s, s, 3)


# --- the sections: each returns (numbers, figure files) ---------------------------------
DPI = 150  # the page shows a figure at 96 CSS px per inch (see `figure`): sharp on a HiDPI screen
# A figure's text in points; at 96 px per inch 8 pt is 10.7 px, the least a page should show.
FONTS = {
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "figure.titlesize": 11,
}
CAM_ALPHA = 0.45  # Grad-CAM over the image: the image stays visible under the heatmap


def plt_figure(*a, **k):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(FONTS)
    return plt, plt.figure(*a, **k)


def save(plt, fig, ctx, name, tight=True):
    if tight:
        fig.tight_layout()
    fig.savefig(os.path.join(ctx["out"], name), dpi=DPI)
    plt.close(fig)
    return name


def cam_colorbar(plt, fig, label="Grad-CAM (per image, 0 to its max)"):
    """Lay the figure out, then one labelled colour scale for its Grad-CAM overlays at the right,
    as see-through as the overlays. Save it with tight=False."""
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    cax = fig.add_axes((0.935, 0.15, 0.012, 0.7))
    sm = plt.cm.ScalarMappable(cmap="jet", norm=plt.Normalize(0, 1))
    fig.colorbar(sm, cax=cax, alpha=CAM_ALPHA, label=label)


# What the page says about this section: title, introduction, the layout of its numbers
# (header, rows of (label, keys, kind, how to read)) and a caption per figure.
PAGE_QSCORE = {
    "title": "Q-Score: does a label-free score flag the probe's mistakes?",
    "intro": "Q-Score (Kalibhat et al., Eq. 3) scores one image from its pooled representation "
    "h alone, without labels: how far its few highly activating features L_i (Eq. 2) stand above "
    "the mean of h. The paper's claim (Sec. 4, Fig. 4) is that images of low Q-Score are the ones "
    "a linear classifier gets wrong. Here the classifier is eval_linear.py's offline linear probe "
    "and the images are the evaluation split.",
    "tables": [
        (
            None,
            [
                ("images evaluated", ["n"], "int", ""),
                (
                    "of these, mis-classified by the probe",
                    ["n_misclassified"],
                    "int",
                    "the positives of the mistakes column below: with few mistakes, "
                    "AUROC and AUPRC move a lot with a handful of images",
                ),
                (
                    "share classified correctly",
                    ["share_correct"],
                    "pct",
                    "the offline probe's top-1 on these images",
                ),
                (
                    "share of images with an empty L_i",
                    ["share_empty_L"],
                    "pct",
                    "no feature above μ_i + ε σ_i: |L_i| counts 0 there, "
                    "and Q_i falls back to the largest feature",
                ),
            ],
        ),
        (
            [
                "Q-Score as a predictor",
                "correct as positive (high Q first)",
                "mistakes as positive (low Q first)",
            ],
            [
                (
                    "AUROC",
                    ["auroc_correct_positive", "auroc_misclassified_positive"],
                    "pct",
                    "chance 50 %, higher is better (the paper's best: 73 % on "
                    "ImageNet-100, 65 % on ImageNet-1K); the columns agree by construction",
                ),
                (
                    "AUPRC",
                    ["auprc_correct_positive", "auprc_misclassified_positive"],
                    "pct",
                    "chance is the share of positives (the correct share, or the mistakes' "
                    "share); higher is better",
                ),
            ],
        ),
        (
            ["mean over the images", "correct", "mis-classified"],
            [
                (
                    "highly activating features |L_i|",
                    ["mean_L_correct", "mean_L_misclassified"],
                    "f2",
                    "Sec. 3 of the paper finds more in correct images; an empty L_i counts 0",
                ),
                (
                    "images with an empty L_i",
                    ["share_empty_L_correct", "share_empty_L_misclassified"],
                    "pct",
                    "",
                ),
                (
                    "confidence of the probe (max softmax)",
                    ["mean_confidence_correct", "mean_confidence_misclassified"],
                    "pct",
                    "usually higher for correct images",
                ),
                (
                    "Q-Score",
                    ["mean_q_correct", "mean_q_misclassified"],
                    "g3",
                    "a useful Q-Score is higher for correct images",
                ),
            ],
        ),
    ],
    "qscore_curves.png": "ROC (left) and precision-recall (right) curves of Q-Score as a predictor "
    "of the probe's outcome, as in Fig. 4 of Kalibhat et al. Blue takes the correctly classified "
    "images as positives and ranks images from high to low Q; orange takes the mistakes as "
    "positives and ranks from low to high Q. On the ROC the dotted diagonal is chance "
    "(AUROC 50 %), and the two curves are one curve turned half a turn about the centre, so their "
    "areas are equal. On the precision-recall plot each curve's chance is the dotted line of its "
    "colour, at the share of its positives: read a curve against its own line.",
    "qscore_bars.png": "Left and middle: the mean number of highly activating features |L_i| and "
    "the probe's mean confidence, for correctly and wrongly classified images. These are the two "
    "measures of Kalibhat et al. Fig. 5, which compares them before and after Q-Score "
    "regularization (for that, train a second run with --qscore-lambda and put both side by side "
    "with interpret.py --compare); here they are split by outcome, and Sec. 3 of the paper expects "
    "the correct bars to be the higher. Right: the distribution of Q_i in both groups, each scaled "
    "to area 1; the further right the correct group lies, the better Q-Score separates the two, "
    "and histograms on top of each other mean it does not.",
}


def section_qscore(ctx):
    p, q, correct = ctx["p"], ctx["q"], ctx["p"]["correct"].astype(bool)
    cur = {
        "correct": binary_curves(q, correct),
        "misclassified": binary_curves(-q, ~correct),
    }  # low Q predicts errors
    size = ctx["mask"].sum(1)
    sel_n = (int(correct.sum()), int((~correct).sum()))
    num = {
        "n": len(q),
        "n_misclassified": sel_n[1],
        "share_correct": float(correct.mean()),
        "share_empty_L": float((size == 0).mean()),
    }
    for name, c in cur.items():
        num[f"auroc_{name}_positive"], num[f"auprc_{name}_positive"] = c["auroc"], c["auprc"]
    for name, sel in (("correct", correct), ("misclassified", ~correct)):
        num[f"mean_L_{name}"] = float(size[sel].mean()) if sel.any() else None
        num[f"share_empty_L_{name}"] = float((size[sel] == 0).mean()) if sel.any() else None
        num[f"mean_confidence_{name}"] = float(p["confidence"][sel].mean()) if sel.any() else None
        num[f"mean_q_{name}"] = float(q[sel].mean()) if sel.any() else None
    plt, fig = plt_figure(figsize=(10, 4))
    ax1, ax2 = fig.add_subplot(121), fig.add_subplot(122)
    for name, c in cur.items():
        if c["auroc"] is not None:
            who = (
                f"{sel_n[0]} correct" if name == "correct" else f"{sel_n[1]} mistakes"
            ) + f" of {len(q)}"
            ax1.plot(c["fpr"], c["tpr"], label=f"{who} as positive: AUROC {100 * c['auroc']:.1f} %")
            ax2.plot(
                c["recall"],
                c["precision"],
                label=f"{who} as positive: AUPRC {100 * c['auprc']:.1f} %",
            )
    ax1.plot([0, 1], [0, 1], "k:", lw=1)
    ax1.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC of Q-Score")
    ax2.axhline(correct.mean(), color="C0", ls=":", lw=1)
    ax2.axhline(1 - correct.mean(), color="C1", ls=":", lw=1)
    ax2.set(
        xlabel="recall", ylabel="precision", title="precision-recall of Q-Score (dotted: chance)"
    )
    ax1.legend()
    ax2.legend()
    files = [save(plt, fig, ctx, "qscore_curves.png")]
    plt, fig = plt_figure(figsize=(11, 3.5))
    for i, (key, label, unit) in enumerate(
        (
            ("mean_L", "mean $|L_i|$", "highly activating features per image"),
            ("mean_confidence", "mean confidence", "max softmax of the probe"),
        )
    ):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.bar(
            ["correct", "mis-classified"],
            [num[f"{key}_correct"] or 0, num[f"{key}_misclassified"] or 0],
            color=["C0", "C1"],
        )
        ax.set(title=label, ylabel=unit)
        ax.set_xticks([0, 1], [f"correct ({sel_n[0]})", f"mis-classified ({sel_n[1]})"])
    ax = fig.add_subplot(133)
    bins = np.linspace(q.min(), q.max(), 40)
    ax.hist(q[correct], bins, alpha=0.6, density=True, label=f"correct ({sel_n[0]})")
    ax.hist(q[~correct], bins, alpha=0.6, density=True, label=f"mis-classified ({sel_n[1]})")
    ax.set(title="Q-Score", xlabel="$Q_i$", ylabel="density (each group's area is 1)")
    ax.legend()
    files.append(save(plt, fig, ctx, "qscore_bars.png"))
    return num, files


PAGE_FEATURES = {
    "title": "Mean representations of correct and mis-classified images",
    "intro": "Kalibhat et al. (Sec. 3, Fig. 3) observe that self-supervised representations are "
    "nearly sparse: a few features stand out in each image, and correctly classified images have "
    "more of them than the mis-classified images of the same class. This section draws that "
    "picture for the evaluation split, with the offline probe deciding what is correct.",
    "tables": [
        (
            None,
            [
                ("classes shown", ["n_classes_shown"], "int", "at most 20"),
                (
                    "feature columns shown",
                    ["n_features_shown"],
                    "int",
                    "for each class, the 4 largest features of its correct images",
                ),
            ],
        )
    ],
    "features_heatmap.png": "Rows are classes and columns a selection of features of h, the same "
    "in both panels: for each class, the four features with the largest mean over its correct "
    "images. A cell is the mean L2-normalized value of the feature over the class's correct (left) "
    "or mis-classified (right) images, darker for larger, as in Fig. 3 of Kalibhat et al. Read it "
    "row by row: a row dark on its class's own columns on the left and pale on the right says the "
    "mistakes lack the highly activating features of correct images; a blank row has no image of "
    "that kind.",
}


def section_features(ctx, per_class=4, max_classes=20):
    """Fig. 3: the same feature columns for both panels: each shown class's per_class
    features of largest mean normalized activation over its correct samples."""
    p, classes = ctx["p"], ctx["classes"]
    hn = p["h"] / np.maximum(np.linalg.norm(p["h"], axis=1, keepdims=True), 1e-12)
    correct, label, size = p["correct"].astype(bool), p["label"], ctx["mask"].sum(1)
    shown = [c for c in range(len(classes)) if (label == c).any()][:max_classes]
    cols = []
    for c in shown:
        sel = (label == c) & correct if ((label == c) & correct).any() else label == c
        cols += [j for j in np.argsort(-hn[sel].mean(0))[:per_class] if j not in cols]
    grids = {k: np.full((len(shown), len(cols)), np.nan) for k in ("correct", "misclassified")}
    num = {
        "n_classes_shown": len(shown),
        "n_features_shown": len(cols),
        "features_shown": [int(j) for j in cols],
        "classes": {},
    }
    for r, c in enumerate(shown):
        row = {}
        for k, sel in (
            ("correct", (label == c) & correct),
            ("misclassified", (label == c) & ~correct),
        ):
            row[f"n_{k}"] = int(sel.sum())
            row[f"mean_L_{k}"] = float(size[sel].mean()) if sel.any() else None
            if sel.any():
                grids[k][r] = hn[sel][:, cols].mean(0)
        num["classes"][classes[c]] = row
    plt, fig = plt_figure(figsize=(12, 0.35 * len(shown) + 2))
    top = np.nanmax([np.nanmax(g) if np.isfinite(g).any() else 0 for g in grids.values()])
    for i, (k, g) in enumerate(grids.items()):
        ax = fig.add_subplot(1, 2, i + 1)
        im = ax.imshow(g, aspect="auto", cmap="Blues", vmin=0, vmax=top)
        ax.set_yticks(range(len(shown)), [classes[c][:12] for c in shown])
        step = max(1, -(-len(cols) // 40))  # at most 40 labelled columns: 8 pt text needs room
        ax.set_xticks(range(0, len(cols), step), cols[::step], fontsize=8, rotation=90)
        ax.set(xlabel="feature j of h", ylabel="class" if i == 0 else None)
        ax.set_title(
            f"{'correct' if k == 'correct' else 'mis-classified'} images (blank: none)",
        )
    fig.colorbar(im, ax=fig.axes, label="mean of the L2-normalized $h_j$")
    fig.savefig(os.path.join(ctx["out"], "features_heatmap.png"), dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return num, ["features_heatmap.png"]


def probe_accuracy(x, y, train, test):
    """Top-1 of a logistic-regression probe on standardized features (scikit-learn, lbfgs).
    The recipe is a fixed 300 iterations for every subset, so that subsets compare at equal
    cost; lbfgs's warning that it had not converged by then is expected and not printed."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    m, s = x[train].mean(0), x[train].std(0) + 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(max_iter=300).fit((x[train] - m) / s, y[train])
    return float(clf.score((x[test] - m) / s, y[test]))


PAGE_DISCRIMINATIVE = {
    "title": "Discriminative features: the class-related part of h",
    "intro": "A_j (Kalibhat et al., Eq. 5) is the share of images for which feature j is highly "
    "activating. Features active for very few images are specific to those images, and features "
    "active for most images are generic; the paper keeps the middle, between the 30th and 85th "
    "percentile of A over the features active at least once, and calls them discriminative "
    "(App. A.1, Fig. A.1). Its Fig. A.3 checks that a linear classifier on these few features "
    "nearly matches one on all features and beats one on as many random features.",
    "tables": [
        (
            None,
            [
                (
                    "features highly activating for at least one image",
                    ["n_active_features"],
                    "int",
                    "",
                ),
                (
                    "discriminative features (the band)",
                    ["band_size"],
                    "int",
                    "found without any label",
                ),
                (
                    "A_j of the band's features",
                    ["band_A_range"],
                    "range100",
                    "the share of images for which each is highly activating",
                ),
                ("probe", ["probe"], "text", ""),
            ],
        )
    ],
    "discriminative.png": "Left: A_j of every feature that is highly activating for at least one "
    "image, in ascending order, with the discriminative band shaded (Fig. A.1 of Kalibhat et al.). "
    "Right: top-1 of a logistic-regression probe trained on one half of the evaluation split and "
    "scored on the other half, on k features: the band or a subset of k features centred on it, "
    "k random features, or the first k PCA components (Fig. A.3); the dotted line marks the band's "
    "size. Discriminative above random means the band holds the class information; close to PCA "
    "means single features do as well as the best linear directions (App. A.2). This probe sees "
    "far fewer images than the offline probe, so compare the lines, not their level.",
}


def section_discriminative(ctx):
    """Fig. A.1 and A.3. The probe trains on a fixed half of the evaluation split and is scored
    on the other half: the comparison between subsets is what counts, not the absolute top-1."""
    from sklearn.decomposition import PCA

    a, h, y = ctx["a"], ctx["p"]["h"].astype(np.float64), ctx["p"]["label"]
    d, band = len(a), discriminative_band(a)
    perm = np.random.RandomState(0).permutation(len(y))
    train, test = perm[: len(y) // 2], perm[len(y) // 2 :]
    sizes = sorted(
        {len(band), *[k for k in (d // 32, d // 16, d // 8, d // 4, d // 2) if k >= 2], d}
    )
    rng = np.random.RandomState(1)
    rows = []
    for k in sizes:
        # k components of k or more training samples are partly noise that standardizing
        # blows up: none
        pca = PCA(k, random_state=0).fit(h[train]) if k < len(train) else None
        rows.append(
            {
                "k": int(k),
                "discriminative": probe_accuracy(h[:, discriminative_subset(a, k)], y, train, test),
                "random": probe_accuracy(
                    h[:, np.sort(rng.choice(d, k, replace=False))], y, train, test
                ),
                "pca": probe_accuracy(pca.transform(h), y, train, test)
                if pca is not None
                else None,
            }
        )
    active = np.sort(a[a > 0])
    num = {
        "n_active_features": int((a > 0).sum()),
        "band_size": int(len(band)),
        "band_A_range": [float(a[band].min()), float(a[band].max())],
        "band": [int(j) for j in band],
        "probe": "logistic regression, half of the eval split -> the other half",
        "accuracy": rows,
    }
    plt, fig = plt_figure(figsize=(11, 4))
    ax = fig.add_subplot(121)
    ax.plot(active, lw=1.5)
    lo, hi = np.searchsorted(active, [a[band].min(), a[band].max()], side="left")
    ax.axvspan(lo, hi, color="C2", alpha=0.2, label=f"30th-85th percentile: {len(band)} features")
    ax.set(
        xlabel="highly activating features, ascending $A_j$",
        ylabel="$A_j$ (% of images)",
        title="$A_j$ (Eq. 5)",
    )
    ax.legend()
    ax = fig.add_subplot(122)
    for key in ("discriminative", "random", "pca"):
        have = [r for r in rows if r[key] is not None]
        ax.plot(
            [r["k"] for r in have],
            [100 * r[key] for r in have],
            "o-",
            label={"pca": "PCA"}.get(key, key),
        )
    ax.axvline(len(band), color="C2", ls=":", lw=1, label=f"the band ({len(band)})")
    ax.set(
        xscale="log",
        xlabel="features kept",
        ylabel="top-1 (%)",
        title="linear probe on feature subsets",
    )
    ticks = [r["k"] for r in rows if r["k"] != len(band)]
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.minorticks_off()
    ax.legend()
    return num, [save(plt, fig, ctx, "discriminative.png")]


def overlay(ax, rgb, heat, title):
    ax.imshow(rgb)
    if np.max(heat) > 0:  # an all-zero heatmap (an empty L_i) is not painted blue
        ax.imshow(heat, cmap="jet", alpha=CAM_ALPHA, vmin=0, vmax=1)
    else:
        title += "\n(no heatmap)" if "\n" not in title else " (none)"
    ax.set_title(title, fontsize=9)
    ax.axis("off")


PAGE_GRADCAM = {
    "title": "Where the highly activating features look (Grad-CAM)",
    "intro": "Grad-CAM (Selvaraju et al. 2017) turns the gradient of a score with respect to the "
    "backbone's last feature map into a heatmap over the image. Kalibhat et al. apply it to highly "
    "activating features: per image, to the sum of the features in L_i (Fig. 6), and per feature, "
    "to the images that activate that feature most (Fig. 2).",
    "tables": [
        (
            None,
            [
                (
                    "features shown in the second figure",
                    ["features_chosen"],
                    "text",
                    "by default 4 of the discriminative band, those most tied to one "
                    "class; --features chooses",
                )
            ],
        )
    ],
    "gradcam_samples.png": "Grad-CAM of the sum of each image's highly activating features, for "
    "correctly (top row) and wrongly (bottom row) classified images, as "
    "Kalibhat et al. Fig. 6 shows for mis-classified ImageNet images. A title gives the true "
    "class, the predicted class, |L_i| and Q_i; red is where the features respond. One hopes for "
    "heatmaps on the object rather than on the background: the paper finds that the mistakes' "
    "heatmaps also cover irrelevant parts, and that they become more compact with Q-Score "
    "regularization.",
    "gradcam_features.png": "One row per feature, as in Kalibhat et al. Fig. 2. Left: for each "
    "class, the percentage of its images for which the feature is highly activating. Right: the "
    "images with the largest value of the feature (h: its normalized value), with the Grad-CAM of "
    "that one feature. A feature that fires for much of one class and little of the others, with "
    "heatmaps on the same part of the object, encodes a class-related attribute (the paper's "
    "example is a zebra's stripes); one that fires across many classes is generic (Fig. A.2).",
}


def section_gradcam(ctx, args, per_kind=6, top_images=5):
    p, q, a, mask, classes = ctx["p"], ctx["q"], ctx["a"], ctx["mask"], ctx["classes"]
    correct = p["correct"].astype(bool)
    pool = sample_rows(ctx, args.max_images)
    rows = np.r_[pool[correct[pool]][:per_kind], pool[~correct[pool]][:per_kind]]
    heat, x = heatmaps_of_l(ctx, rows), load_images(ctx, rows)
    plt, fig = plt_figure(figsize=(2 * min(len(rows), per_kind), 5.0))
    for i, r in enumerate(rows):
        kind = "correct" if correct[r] else "wrong"
        col = i if correct[r] else i - (correct[rows]).sum()
        ax = fig.add_subplot(2, per_kind, (0 if correct[r] else per_kind) + col + 1)
        overlay(
            ax,
            to_rgb(ctx, x[i]),
            heat[i],
            f"{kind}: {classes[p['label'][r]][:8]}->{classes[p['prediction'][r]][:8]}\n"
            f"$|L_i|$={mask[r].sum()} $Q_i$={q[r]:.3f}",
        )
    cam_colorbar(plt, fig)
    files = [save(plt, fig, ctx, "gradcam_samples.png", tight=False)]

    # Fig. 2: per-class share of samples for which a feature is highly activating
    label, n_cls = p["label"], len(classes)
    hist = np.stack(
        [
            mask[label == c].mean(0) * 100 if (label == c).any() else np.zeros(mask.shape[1])
            for c in range(n_cls)
        ]
    )  # (C, D)
    if args.features:
        try:
            chosen = [int(j) for j in args.features.split(",")]
        except ValueError:
            raise common.UserError(
                f"--features {args.features}: give feature indices like 12,301."
            ) from None
        if max(chosen) >= mask.shape[1] or min(chosen) < 0:
            raise common.UserError(
                f"--features {args.features}: the representation has {mask.shape[1]} features."
            )
    else:  # the band's features most tied to one class
        band = discriminative_band(a)
        chosen = [int(j) for j in band[np.argsort(-hist[:, band].max(0), kind="stable")][:4]]
    hn = p["h"] / np.maximum(np.linalg.norm(p["h"], axis=1, keepdims=True), 1e-12)
    plt, fig = plt_figure(figsize=(1.75 * (top_images + 2), 2.4 * len(chosen)))
    grid = fig.add_gridspec(len(chosen), top_images + 2)
    samples = [
        {
            "index": int(p["index"][r]),
            "correct": bool(correct[r]),
            "L": int(mask[r].sum()),
            "q": float(q[r]),
        }
        for r in rows
    ]
    num = {"features_chosen": ",".join(map(str, chosen)), "samples": samples, "features": {}}
    for f_i, j in enumerate(chosen):
        top = np.argsort(-hn[:, j])[:top_images]
        top = top[np.argsort(label[top], kind="stable")]  # grouped by class
        xj = load_images(ctx, top)
        hj = common.grad_cam(ctx["backbone"], xj, j).cpu().numpy()
        ax = fig.add_subplot(grid[f_i, :2])
        ax.bar(range(n_cls), hist[:, j], color="C0")
        ax.set_title(f"feature {j}: $A_j$ = {a[j]:.1f} %")
        ax.set_ylabel("% of the class's images\nhighly activating it")
        ax.set_xticks(range(n_cls), [c[:8] for c in classes] if n_cls <= 20 else [], rotation=90)
        ax.set_xlabel("class")
        for t, r in enumerate(top):
            ax = fig.add_subplot(grid[f_i, 2 + t])
            overlay(ax, to_rgb(ctx, xj[t]), hj[t], f"{classes[label[r]][:10]} h={hn[r, j]:.3f}")
        num["features"][str(j)] = {
            "A_j": float(a[j]),
            "class_share_percent": [float(v) for v in hist[:, j]],
            "top_indices": [int(p["index"][r]) for r in top],
            "top_labels": [classes[label[r]] for r in top],
        }
    cam_colorbar(plt, fig)
    files.append(save(plt, fig, ctx, "gradcam_features.png", tight=False))
    return num, files


def read_masks(ctx, folder):
    """{prediction row: (core (s, s) bool or None, spurious or None)} for the images with masks."""
    kinds = {}
    with open(os.path.join(folder, "features.csv")) as fh:
        for row in csv.DictReader(fh):
            if row.get("kind") not in ("core", "spurious"):
                raise common.UserError(
                    f"{folder}/features.csv: every row needs class, feature and kind core|spurious."
                )
            kinds[(row["class"], str(row["feature"]))] = row["kind"]
    ds, p, size = ctx["dataset"], ctx["p"], ctx["size"]
    names = {}  # image name -> prediction row
    for r, i in enumerate(p["index"]):
        names[
            os.path.splitext(os.path.basename(ds.samples[i][0]))[0]
            if hasattr(ds, "samples")
            else str(i)
        ] = r
    # an original-size mask goes through the image's resize and crop (common.eval_transform),
    # nearest-neighbour
    geometry = (
        []
        if size == ctx["native"] and size <= 64
        else [
            T.Resize(
                int(round(size * 256 / 224)) if size > 64 else size,
                interpolation=T.InterpolationMode.NEAREST,
            ),
            T.CenterCrop(size),
        ]
    )
    found = {}
    for (cls, feat), kind in kinds.items():
        d = os.path.join(folder, cls, f"feature_{feat}")
        for fname in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            r = names.get(os.path.splitext(fname)[0])
            if r is None:
                continue
            m = Image.open(os.path.join(d, fname)).convert("L")
            if m.size != (size, size):
                orig = ds[int(p["index"][r])][0].size
                if m.size != orig:
                    raise common.UserError(
                        f"mask '{d}/{fname}' is {m.size[0]}x{m.size[1]} px, but its image is "
                        f"{orig[0]}x{orig[1]} and the model sees {size}x{size}."
                    )
                m = T.Compose(geometry)(m)
            m = np.asarray(m, np.float32) / 255 > 0.5
            core, sp = found.get(r, (None, None))
            if kind == "core":
                core = m if core is None else core | m
            else:
                sp = m if sp is None else sp | m
            found[r] = (core, sp)
    if not found:
        raise common.UserError(
            f"no mask in '{folder}' names an image of {len(p['index'])} evaluated images "
            f"(names are file stems for ImageFolder, split indices otherwise)."
        )
    return found


PAGE_MIOU = {
    "title": "Overlap of the heatmaps with core and spurious masks (mIoU)",
    "intro": "With Salient ImageNet masks (--masks), each image's heatmap of highly activating "
    "features is compared with the regions annotated as core (the object) and as spurious "
    "(background and context), by the soft IoU of Kalibhat et al. Sec. 5: the share of the "
    "heatmap's mass inside the mask. Fig. 7 of the paper shows examples and Fig. 8 the scores.",
    "tables": [
        (
            None,
            [
                ("images with masks", ["n_images"], "int", ""),
                (
                    "of these, images without a heatmap",
                    ["n_blank_heatmaps"],
                    "int",
                    "an empty L_i (or a Grad-CAM that is 0 everywhere): the heatmap has no "
                    "area, so its IoU with any mask is 0",
                ),
            ],
        ),
        (
            ["mIoU", "correct", "mis-classified"],
            [
                ("images with masks", ["n_correct", "n_misclassified"], "int", ""),
                (
                    "with core masks, all images (the paper's mIoU)",
                    ["miou_core_correct", "miou_core_misclassified"],
                    "pct",
                    "the mean over all N images of Sec. 5; an image without a heatmap counts 0; "
                    "higher is better",
                ),
                (
                    "with spurious masks, all images (the paper's mIoU)",
                    ["miou_spurious_correct", "miou_spurious_misclassified"],
                    "pct",
                    "lower is better; the paper finds core above spurious for every method",
                ),
                (
                    "share of images with a heatmap",
                    ["share_with_heatmap_correct", "share_with_heatmap_misclassified"],
                    "pct",
                    "the images the two rows below cover",
                ),
                (
                    "with core masks, only images with a heatmap",
                    ["miou_core_correct_with_heatmap", "miou_core_misclassified_with_heatmap"],
                    "pct",
                    "not the paper's form: where the features look when they are there",
                ),
                (
                    "with spurious masks, only images with a heatmap",
                    [
                        "miou_spurious_correct_with_heatmap",
                        "miou_spurious_misclassified_with_heatmap",
                    ],
                    "pct",
                    "not the paper's form",
                ),
            ],
        ),
        (None, [("overlap measure", ["soft_iou"], "text", "")]),
    ],
    "miou.png": "Left: mIoU of the heatmaps with the core and with the spurious masks over all "
    "images with masks (an image without a heatmap counts 0), for correctly and wrongly classified "
    "images, as in Kalibhat et al. Fig. 8. Right: three images "
    "with their heatmap and their core and spurious masks, as in Fig. 7. Core bars above spurious "
    "bars mean the features look at the object; the paper also finds less core overlap for "
    "mistakes than for correct images.",
}


def miou_scores(heat, masks, correct):
    """mIoU of Kalibhat et al. Sec. 5: mIoU = 1/N sum_i s(Ar_i ∩ M_i) / s(Ar_i ∪ M_i) over all N
    images that have the mask, for the core and the spurious masks and for correct and
    mis-classified images apart. An image whose L_i is empty has an all-zero heatmap: its area
    Ar_i is empty and s(.) sums heatmap values, so s(Ar_i ∩ M_i) = s(Ar_i ∪ M_i) = 0, the IoU of an
    empty area with a mask, which counts 0 (soft_iou's 0/0): it overlaps no mask. Beside the
    paper's numbers, the mean over the images that have a heatmap only ("_with_heatmap"), with
    the share of images it covers. heat (N, s, s) >= 0; masks: N pairs (core, spurious), each an
    (s, s) bool or None; correct (N,) bool. Returns (numbers, IoU per image {kind: (N,) nan where
    the image has no such mask})."""
    correct = np.asarray(correct, bool)
    blank = heat.reshape(len(heat), -1).max(1) <= 0
    iou = {k: np.full(len(heat), np.nan) for k in ("core", "spurious")}
    for i, pair in enumerate(masks):
        for k, m in zip(("core", "spurious"), pair):
            if m is not None:
                iou[k][i] = soft_iou(heat[i], m)
    num = {
        "n_images": int(len(heat)),
        "n_blank_heatmaps": int(blank.sum()),
        "soft_iou": "heatmap mass inside the mask (Sec. 5, s = sum of heatmap values)",
    }
    for name, sel in (("correct", correct), ("misclassified", ~correct)):
        num[f"n_{name}"] = int(sel.sum())
        num[f"share_with_heatmap_{name}"] = float((~blank[sel]).mean()) if sel.any() else None
        for k, v in iou.items():
            every, shown = v[sel], v[sel & ~blank]
            num[f"miou_{k}_{name}"] = float(np.nanmean(every)) if np.isfinite(every).any() else None
            num[f"miou_{k}_{name}_with_heatmap"] = (
                float(np.nanmean(shown)) if np.isfinite(shown).any() else None
            )
    return num, iou


def section_miou(ctx, args):
    if not args.masks:
        return {"skipped": "no --masks folder given"}, []
    found = read_masks(ctx, args.masks)
    rows = np.array(sorted(found))[: args.max_images]
    heat = heatmaps_of_l(ctx, rows)
    correct = ctx["p"]["correct"].astype(bool)[rows]
    num, iou = miou_scores(heat, [found[r] for r in rows], correct)
    plt, fig = plt_figure(figsize=(12, 4))
    ax = fig.add_subplot(1, 4, 1)
    labels = ["core\ncorrect", "core\nwrong", "spurious\ncorrect", "spurious\nwrong"]
    vals = [
        num[f"miou_{k}_{n}"] for k in ("core", "spurious") for n in ("correct", "misclassified")
    ]
    ax.bar(labels, [100 * (v or 0) for v in vals], color=["C0", "C1", "C0", "C1"])
    ax.set(title="mIoU over all images with masks", ylabel="mIoU (%)")
    x = load_images(ctx, rows[:3])
    for i in range(len(x)):
        ax = fig.add_subplot(3, 4, 4 * i + 2)
        overlay(
            ax,
            to_rgb(ctx, x[i]),
            heat[i],
            f"IoU core {iou['core'][i]:.2f} sp {iou['spurious'][i]:.2f}",
        )
        for t, k in enumerate(("core", "spurious")):
            ax = fig.add_subplot(3, 4, 4 * i + 3 + t)
            m = found[rows[i]][t]
            ax.imshow(np.zeros((ctx["size"],) * 2) if m is None else m, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{k} mask", fontsize=9)
            ax.axis("off")
    cam_colorbar(plt, fig)
    return num, [save(plt, fig, ctx, "miou.png", tight=False)]


PAGE_ADAI = {
    "title": "Average Drop and Average Increase of class explanation maps",
    "intro": "Seyfi et al. (Sec. 3.4) judge a backbone's explanations by feeding them back: the "
    "class activation map (Eq. 8) of the true class, from the offline probe's weights, dims the "
    "image where the class is not seen, and the probe scores the dimmed image again. If the map "
    "keeps what the decision needs, the class's probability should not drop. The definitions are "
    "Grad-CAM++'s (Chattopadhay et al. 2018), which Seyfi et al. cite; their Table 4 reports "
    "AD 26-30 % and AI 37-46 % for SwAV-based ImageNet models.",
    "tables": [
        (None, [("images", ["n_images"], "int", "")]),
        (
            ["", "all images", "correct", "mis-classified"],
            [
                (
                    "Average Drop",
                    ["average_drop", "average_drop_correct", "average_drop_misclassified"],
                    "pct100",
                    "mean of max(0, Y − O) / Y; 0 % is no loss, lower is better",
                ),
                (
                    "Average Increase",
                    [
                        "average_increase",
                        "average_increase_correct",
                        "average_increase_misclassified",
                    ],
                    "pct100",
                    "share of images with O > Y; higher is better",
                ),
            ],
        ),
        (None, [("score", ["score"], "text", "")]),
    ],
    "adai.png": "Top: images, with Y, the probe's probability of the true class. Middle: the class "
    "activation map of that class (Seyfi et al. Eq. 8; their Fig. 3 shows such maps on Pascal "
    "VOC). Bottom: the explanation map, the image multiplied by the map scaled to [0, 1], with O, "
    "the probe's probability on it. A good map keeps O close to Y or above it while dimming much "
    "of the image.",
}


def section_adai(ctx, args, batch=64):
    p, head, dev = ctx["p"], ctx["head"].to(ctx["device"]), ctx["device"]
    mean, std = ctx["head_mean"].to(dev), ctx["head_std"].to(dev)
    rows = sample_rows(ctx, args.max_images)
    ys, os_, shown = [], [], None
    for s in range(0, len(rows), batch):
        r = rows[s : s + batch]
        x = load_images(ctx, r)
        labels = torch.as_tensor(p["label"][r], device=dev)
        y, o, cam, explained = explanation_scores(
            ctx["backbone"], head, mean, std, x, labels, ctx["stats"]
        )
        ys.append(y.cpu().numpy())
        os_.append(o.cpu().numpy())
        if shown is None:  # the first images, for the figure
            shown = (x[:6], cam[:6], explained[:6], y[:6], o[:6], r[:6])
    y, o = np.concatenate(ys), np.concatenate(os_)
    ad, ai = average_drop_increase(y, o)
    correct = p["correct"].astype(bool)[rows]
    num = {
        "n_images": int(len(rows)),
        "average_drop": ad,
        "average_increase": ai,
        "score": "softmax probability of the true class; "
        "explanation = image x normalized CAM (Eq. 8)",
    }
    for name, sel in (("correct", correct), ("misclassified", ~correct)):
        if sel.any():
            num[f"average_drop_{name}"], num[f"average_increase_{name}"] = average_drop_increase(
                y[sel], o[sel]
            )
    x, cam, explained, y6, o6, r6 = shown
    plt, fig = plt_figure(figsize=(2 * len(x), 6.3))
    for i in range(len(x)):
        ax = fig.add_subplot(3, len(x), i + 1)
        ax.imshow(to_rgb(ctx, x[i]))
        ax.set_title(f"{ctx['classes'][p['label'][r6[i]]][:10]} Y={y6[i]:.2f}", fontsize=9)
        ax.axis("off")
        overlay(
            fig.add_subplot(3, len(x), len(x) + i + 1),
            to_rgb(ctx, x[i]),
            cam[i].cpu().numpy(),
            "class CAM",
        )
        ax = fig.add_subplot(3, len(x), 2 * len(x) + i + 1)
        ax.imshow(to_rgb(ctx, explained[i]))
        ax.set_title(f"explanation O={o6[i]:.2f}", fontsize=9)
        ax.axis("off")
    cam_colorbar(plt, fig, "class activation map, 0 to 1")
    return num, [save(plt, fig, ctx, "adai.png", tight=False)]


# --- the page: names, numbers and words --------------------------------------------------
# Each number a person reads: key -> (label, kind, how to read it). kind says how it is printed:
# "pct" a share in [0, 1] shown in percent, "pct100" already in percent, "int", "f2", "g3" and
# "g4" (significant digits), "sec", "text". {chance} in a hint becomes the chance level of the
# data set. A key that is not here (a method's own metric) is printed with its name in words.
NUMBERS = {
    # the run (interpret.json's "run", from linear.json)
    "run_dir": ("run folder", "text", ""),
    "dataset": ("data set", "text", ""),
    "image_size": ("image side seen by the backbone (px)", "int", ""),
    "eps": (
        "ε of highly activating features (Eq. 2)",
        "g3",
        "h_ij > μ_i + ε σ_i; the paper uses 3, a lower ε admits more",
    ),
    "offline_linear_top1": ("offline linear probe, top-1", "pct", "{chance}higher is better"),
    "offline_linear_top5": ("offline linear probe, top-5", "pct", "higher is better"),
    "knn_top1_k20": ("offline kNN top-1, k = 20", "pct", "{chance}higher is better"),
    "knn_top1_k200": ("offline kNN top-1, k = 200", "pct", "{chance}higher is better"),
    "random_init_offline_linear_top1": (
        "offline linear probe, top-1, of the random-init backbone",
        "pct",
        "the same architecture at its seed-0 initialization through eval_linear.py's same probe: "
        "what training has to beat",
    ),
    "random_init_knn_top1_k20": (
        "offline kNN top-1, k = 20, of the random-init backbone",
        "pct",
        "the same architecture at its seed-0 initialization, the same bank and test images: "
        "what training has to beat",
    ),
    "random_init_knn_top1_k200": (
        "offline kNN top-1, k = 200, of the random-init backbone",
        "pct",
        "the same, k = 200",
    ),
    "n_train": ("training images of the probe (the kNN bank)", "int", ""),
    "n_test": (
        "test images of the probe and the kNN",
        "int",
        "each top-1 above is a share of these",
    ),
    "random_init_online_knn_top1": (
        "online kNN top-1 of the random-init backbone",
        "pct",
        "the online monitor's protocol (--knn-limit bank, k = 200, all test images): the "
        "dashed line of the kNN panel",
    ),
    # metrics.jsonl, one line per epoch
    "epoch": ("epochs trained", "int", ""),
    "lr": ("learning rate", "g3", "warm-up, then cosine decay"),
    "loss": ("total loss", "g4", "should fall; not comparable across methods or add-on settings"),
    "loss_ssl": (
        "SSL loss (the method's own)",
        "g4",
        "should fall; compare runs of one method only",
    ),
    "loss_qscore": ("Q-Score term of Eq. 4", "g4", "−λ × mean of 1{Q_i < α} Q_i: never positive"),
    "loss_mask": (
        "correlation-mask loss L_μ",
        "g4",
        "Seyfi et al. Eq. 5: attention β against mask μ; should fall",
    ),
    "loss_cls": (
        "cluster-classification loss L_cls",
        "g4",
        "Seyfi et al. Eq. 6, against k-means pseudo-labels; should fall",
    ),
    "knn_top1": (
        "online kNN top-1",
        "pct",
        "{chance}higher is better; the script's monitor on --knn-limit images",
    ),
    "loss_step": (
        "loss at each progress line (steps.jsonl)",
        "g4",
        "one batch each, so noisier than the epoch's mean; between epochs at its step's place",
    ),
    "collapse_std": (
        "collapse monitor (std of normalized z)",
        "g3",
        "0 is a collapsed embedding; about 1/√d when z spreads over d dimensions",
    ),
    "qscore": (
        "mean Q-Score, training views",
        "g3",
        "Eq. 3; Q-Score regularization should raise it",
    ),
    "qscore_active": (
        "mean |L_i|, training views",
        "f2",
        "highly activating features per view (Eq. 2); empty counts 0",
    ),
    "qscore_empty": ("share of views with an empty L_i", "pct", "no feature above μ_i + ε σ_i"),
    "qscore_under_alpha": (
        "share of views with Q_i < α",
        "pct",
        "the views Eq. 4 acts on: about --qscore-alpha-quantile when α is the batch's quantile "
        "(the default); with a fixed α it falls as Q-Scores rise",
    ),
    "queue_used": ("share of steps using SwAV's queue", "pct", ""),
    "images_per_s": ("training images per second", "g3", "higher is faster"),
    "seconds": ("seconds per epoch", "sec", ""),
    "peak_mem_gb": ("peak GPU memory (GB)", "g3", "0 on the CPU"),
}
PAGES = {
    "qscore": PAGE_QSCORE,
    "features": PAGE_FEATURES,
    "discriminative": PAGE_DISCRIMINATIVE,
    "gradcam": PAGE_GRADCAM,
    "miou": PAGE_MIOU,
    "adai": PAGE_ADAI,
}
# the compare table and the last-epoch table sum up these over the epochs instead of taking the last
SUMMARY = {
    "seconds": ("training time, all epochs", np.sum),
    "images_per_s": ("training images per second, mean", np.mean),
    "peak_mem_gb": ("peak GPU memory (GB), largest", np.max),
}
TRAINING_FIRST = (
    "loss",
    "loss_step",
    "loss_ssl",
    "loss_qscore",
    "loss_mask",
    "loss_cls",
    "knn_top1",
    "collapse_std",
    "qscore",
    "qscore_active",
    "qscore_empty",
    "qscore_under_alpha",
)
TRAINING_LAST = (
    "lr",
    "images_per_s",
    "seconds",
    "peak_mem_gb",
)  # bookkeeping after the method's own keys
IGNORED_FLAGS = (
    "run_dir",
    "resume",
    "device",
    "workers",
    "data_path",
    "compile",
    "log_every",
    "log_seconds",
)

TRAINING_READING = (
    "The losses (the total, the method's SSL loss and any add-on term: Kalibhat et al. Eq. 4 for "
    "Q-Score, Seyfi et al. Eq. 5 and 6 for cross-attention) should fall, but their levels are not "
    "comparable between methods. The online kNN top-1 is the script's own monitor (weighted kNN, "
    "k = 200, on --knn-limit training images), not the offline probe, and should rise. The "
    "collapse monitor (solo-learn's std of the L2-normalized embedding) sinking toward 0 means the "
    "embedding collapses. The Q-Score panels average Eq. 2 and 3 of Kalibhat et al. over the "
    "training views: --qscore-lambda should raise the mean Q-Score and |L_i| (and, with a fixed α, "
    "lower the share under it; with α the batch's quantile that share stays at the quantile)."
)
PAGE_TRAINING = {
    "title": "Training curves",
    "intro": "What the method script wrote to metrics.jsonl while it trained, one value per epoch "
    "(averages over the epoch's steps). They say whether training went as intended before any "
    "analysis of the finished backbone.",
    "caption": "One panel per quantity of metrics.jsonl, against the epoch. " + TRAINING_READING,
    "compare": "One panel per quantity of metrics.jsonl against the epoch, one colour and line "
    "style per run (the legend is at the top), all runs on the same axes. " + TRAINING_READING,
}


# the papers' notation written with underscores (L_i, A_j, h_ij, L_cls) is set as subscripts
MATH = re.compile(r"(?<![\w.-])([A-Za-zμσαβ])_([A-Za-zμ]{1,3})(?![\w])")


def prose(text):
    """Words of this file as HTML: escaped, the papers' subscripts as subscripts. Names that come
    from the data (runs, classes, folders) are only escaped."""
    return MATH.sub(r"\1<sub>\2</sub>", html.escape(text))


def words(key):
    """A name nobody wrote a label for, readable: loss_foo_bar -> 'loss foo bar'."""
    return key.replace("_", " ").strip()


def number_label(key):
    return NUMBERS[key][0] if key in NUMBERS else words(key)


def show(v, kind):
    """A number as a person reads it."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if kind == "text" or isinstance(v, str):
        return str(v)
    if kind == "pct":
        return f"{100 * v:.1f} %"
    if kind == "pct100":
        return f"{v:.1f} %"
    if kind == "int":
        return f"{int(round(v)):,}"
    if kind == "f2":
        return f"{v:.2f}"
    if kind == "range100":  # [lo, hi], already in percent
        return f"{v[0]:.1f} % to {v[1]:.1f} %"
    if kind == "sec":
        return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"
    return f"{v:.{4 if kind == 'g4' else 3}g}"


def kind_of(key, v):
    if key in NUMBERS:
        return NUMBERS[key][1]
    return (
        "text" if isinstance(v, str) else "int" if isinstance(v, int) else "g3"
    )  # lists are not printed


def hint(text, chance):
    return text.replace("{chance}", f"chance {100 * chance:.0f} %; " if chance else "")


def read_json(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


def read_metrics(run_dir):
    """metrics.jsonl as {key: (epochs, values)}, in the file's key order. A resumed run may have
    written an epoch twice: the last line of an epoch counts. A line cut short by a kill, and
    values that are not numbers, are left out."""
    by_epoch, keys = {}, []
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("epoch"), (int, float)):
                by_epoch[row["epoch"]] = row
                keys += [k for k in row if k not in keys]
    out = {}
    for k in keys:
        pts = [
            (e, float(r[k]))
            for e, r in sorted(by_epoch.items())
            if isinstance(r.get(k), (int, float))
            and not isinstance(r.get(k), bool)
            and np.isfinite(r[k])
        ]
        if pts and k != "epoch":
            out[k] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
    if by_epoch:
        out["epoch"] = (np.array(sorted(by_epoch)), np.array(sorted(by_epoch), dtype=float))
    # the kNN before the first step (common.Run, a new run with --knn-every): epoch 0 of the curve
    if "knn_top1_init" in out and "knn_top1" in out:
        x, y = out["knn_top1"]
        out["knn_top1"] = (
            np.concatenate([[0], x]),
            np.concatenate([out["knn_top1_init"][1][:1], y]),
        )
    out.pop("knn_top1_init", None)
    out.pop("knn_random_init", None)  # drawn as the reference line, not as a panel of its own
    steps = read_steps(run_dir)
    if steps is not None:
        out["loss_step"] = steps
    return out


def read_steps(run_dir):
    """steps.jsonl (the loss of every progress line) as (epochs, losses), each step at its place
    in its epoch: epoch e, step s of S sits at e - 1 + s / S (S: the largest step logged, an
    epoch's last step always is). None without the file or with fewer than 2 lines."""
    path = os.path.join(run_dir, "steps.jsonl")
    if not os.path.isfile(path):
        return None
    rows = {}
    with open(path) as fh:
        for line in fh:
            try:
                r = json.loads(line)
                rows[(int(r["epoch"]), int(r["step"]))] = float(r["loss"])
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                continue
    rows = {k: v for k, v in rows.items() if np.isfinite(v)}
    if len(rows) < 2:
        return None
    per_epoch = max(s for _, s in rows)
    keys = sorted(rows)
    return (
        np.array([e - 1 + s / per_epoch for e, s in keys]),
        np.array([rows[k] for k in keys]),
    )


def training_keys(runs):
    """The keys to draw, in reading order: losses, monitors, the method's own keys, bookkeeping.
    A total loss equal to the SSL loss in every run (no add-on term) is drawn once."""
    keys = []
    for _, m in runs:
        keys += [k for k in m if k not in keys and k != "epoch"]
    same = all(
        "loss_ssl" not in m
        or (
            "loss" in m
            and np.array_equal(m["loss"][0], m["loss_ssl"][0])
            and np.allclose(m["loss"][1], m["loss_ssl"][1])
        )
        for _, m in runs
    )
    keys = [k for k in keys if not (same and k == "loss_ssl")]
    keys = [
        k
        for k in keys
        if not (k == "peak_mem_gb" and all(not np.any(m[k][1]) for _, m in runs if k in m))
    ]
    first = [k for k in TRAINING_FIRST if k in keys]
    last = [k for k in TRAINING_LAST if k in keys]
    return first + [k for k in keys if k not in first and k not in last] + last


STYLES = ("-", "--", ":", "-.")  # lines of runs that coincide stay visible
# Quantities that can stay constant over a whole run by construction: drawn only when they move.
# (An epoch's share under a quantile α is that quantile; bad_images is 0 on readable data.)
FOLDABLE = ("qscore_under_alpha", "bad_images", "queue_used", "peak_mem_gb")
FLOOR = 0.05  # a panel's y axis spans at least this share of its largest |value|


def constant_keys(runs, keys):
    """{key: value} of the keys that are one constant value in every epoch of every run, among
    FOLDABLE and any key with two or more points in some run: a flat panel says nothing the
    value does not, so the page states the value instead of drawing it."""
    out = {}
    for k in keys:
        ys = [m[k][1] for _, m in runs if k in m]
        flat = np.concatenate(ys) if ys else np.array([])
        if not len(flat) or not np.allclose(flat, flat[0], rtol=1e-6, atol=1e-12):
            continue
        if k in FOLDABLE or any(len(y) > 1 for y in ys):
            out[k] = float(flat[0])
    return out


def honest_range(ax, values):
    """Tiny changes are not stretched over the whole axis: the y axis spans at least FLOOR of
    the largest |value|, and a note in the panel gives the span in numbers."""
    values = np.asarray(values, float)
    lo, hi, scale = values.min(), values.max(), np.abs(values).max()
    if scale == 0 or hi - lo >= FLOOR * scale:
        return
    mid, half = (hi + lo) / 2, FLOOR * scale / 2
    ax.set_ylim(mid - half, mid + half)
    span = "constant" if hi == lo else f"all within {hi - lo:.2g} ({100 * (hi - lo) / scale:.2g} %)"
    ax.text(0.02, 0.04, span, transform=ax.transAxes, fontsize=8, color="#555", va="bottom")


def training_figure(runs, path, references=None, colors=None):
    """runs: [(label, metrics of read_metrics)]. One panel per key, one line per run; colors[i]
    (default i) is run i's colour index, the same in every panel (runs of one seed group share
    one, with their own line styles). references: {key: [(value, label)]}, drawn as dashed grey
    lines (the random-init kNN). Keys constant over every run (constant_keys) are not drawn.
    Returns what was drawn, read back from the figure's lines: {key: {line label: [[epoch,
    value], ...]}} (values as plotted; a reference line has its label and two end points)."""
    import textwrap

    from matplotlib.ticker import MaxNLocator

    keys = training_keys(runs)
    folded = constant_keys(runs, keys)
    keys = [k for k in keys if k not in folded]
    if not keys:
        return {}
    colors = list(range(len(runs))) if colors is None else colors
    references = references or {}
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    top = 0.4 if len(runs) > 1 else 0.0
    plt, fig = plt_figure(figsize=(3 * cols, 2.6 * rows + top))
    for i, k in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_gid(k)
        pct = k in NUMBERS and NUMBERS[k][1] == "pct"
        drawn = []
        for c, (label, m) in enumerate(runs):
            if k in m:
                x, y = m[k]
                y = 100 * y if pct else y
                drawn.append(y)
                ax.plot(
                    x,
                    y,
                    ls=STYLES[c % 4],
                    marker="osD^"[c % 4] if len(x) <= 30 else None,
                    ms=4,
                    lw=1.5,
                    color=f"C{colors[c] % 10}",
                    label=label,
                )
        for value, label in references.get(k, []):
            v = 100 * value if pct else value
            ax.axhline(v, color="#444", ls=(0, (4, 3)), lw=1.2, label=label)
            ax.annotate(
                f"{label} {v:.1f}{' %' if pct else ''}",
                (1, v),
                xycoords=("axes fraction", "data"),
                xytext=(-3, 3),
                textcoords="offset points",
                ha="right",
                fontsize=8,
                color="#444",
            )
            drawn.append([v])
        name = (
            number_label(k)
            + (" (%)" if pct else "")
            + (
                " = SSL loss"
                if k == "loss" and "loss_ssl" not in keys and any("loss_ssl" in m for _, m in runs)
                else ""
            )
        )
        ax.yaxis.set_major_locator(MaxNLocator(5, steps=[1, 2, 5, 10]))
        if pct:  # a share stays within 0-100 %, and a line at 100 % stays visible
            lo, hi = ax.get_ylim()
            ax.set_ylim(max(lo, -2), min(hi, 102))
            ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= 100])
        else:
            honest_range(ax, np.concatenate(drawn))
        ax.set_title(MATH.sub(r"$\1_{\2}$", "\n".join(textwrap.wrap(name, 34))), fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if i >= len(keys) - cols:
            ax.set_xlabel("epoch")
    if len(runs) > 1:
        fig.legend(
            [
                plt.Line2D([], [], color=f"C{colors[c] % 10}", ls=STYLES[c % 4], lw=2)
                for c in range(len(runs))
            ],
            [r[0] for r in runs],
            loc="upper center",
            ncol=min(len(runs), 4),
            frameon=False,
        )
    fig.tight_layout(rect=(0, 0, 1, 1 - top / (2.6 * rows + top)))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return {
        ax.get_gid(): {
            ln.get_label(): [[float(a), float(b)] for a, b in zip(ln.get_xdata(), ln.get_ydata())]
            for ln in ax.get_lines()
        }
        for ax in fig.axes
        if ax.get_gid()
    }


def run_method(run_dir):
    """The method's name, from the checkpoint (memory-mapped: only the small entries are read)."""
    try:
        return str(
            torch.load(
                os.path.join(run_dir, "checkpoint.pt"),
                map_location="cpu",
                mmap=True,
                weights_only=True,
            ).get("method", "")
        )
    except (
        Exception
    ):  # no checkpoint, or one this reader cannot open: the page goes without the name
        return ""


METHOD_NAMES = {
    "simclr": "SimCLR",
    "moco": "MoCo",
    "byol": "BYOL",
    "simsiam": "SimSiam",
    "swav": "SwAV",
    "dino": "DINO",
}
# a flag only one script has: the method of a run whose checkpoint.pt is gone
METHOD_FLAGS = (
    ("moco_version", "moco"),
    ("sinkhorn_epsilon", "swav"),
    ("student_temp", "dino"),
    ("fix_pred_lr", "simsiam"),
    ("loss_scale", "byol"),
    ("projector", "simclr"),
    ("proj_last_bn", "simclr"),  # before --projector
)


def method_title(saved, method=""):
    """The method as its paper writes it ("MoCo v3", "SimCLR"), from the checkpoint's method name
    or else from args.json; "" when neither tells."""
    m = method or next((name for flag, name in METHOD_FLAGS if flag in (saved or {})), "")
    title = METHOD_NAMES.get(m, m)
    if m == "moco" and (saved or {}).get("moco_version"):
        title += f" v{saved['moco_version']}"
    return title


def page_title(saved, method, run_dir):
    """'SimCLR on digits' from the method and args.json's data set; the folder's name only when
    args.json is missing."""
    m, data = method_title(saved, method), (saved or {}).get("dataset")
    if m and data:
        return f"{m} on {data}"
    return m or f"the run {os.path.basename(os.path.normpath(run_dir))}"


def references(saved, linear, device, workers=0):
    """The random-init reference: kNN top-1 of the same architecture at its seed-0 initialization
    with the online monitor's protocol (common.random_init_knn; args.json: k = 200, the
    --knn-limit bank) as "online"; as "offline", eval_linear.py's own reference in linear.json
    (the same linear probe and kNN of the untrained network), or for a linear.json without one,
    common.random_init_knn with its protocol (its training images as the bank, its test images,
    k = 20 and 200); either is missing when its file is.
    {"skipped": why} instead when the data set cannot be read here."""
    ref = {}
    try:
        if saved.get("dataset"):
            a = argparse.Namespace(
                dataset=saved["dataset"],
                data_dir=saved.get("data_dir", "data"),
                backbone=saved.get("backbone", "resnet18"),
                image_size=saved.get("image_size") or 0,
                knn_limit=saved.get("knn_limit"),
            )
            ref["online"] = common.random_init_knn(a, device, ks=(200,), workers=workers)
        if linear.get("random_init"):  # eval_linear.py's: the same probe, linear and kNN
            ref["offline"] = linear["random_init"]
        elif linear.get("dataset") and linear.get("backbone"):  # a linear.json of before it
            recipe = linear.get("recipe", {})
            a = argparse.Namespace(
                dataset=linear["dataset"],
                data_dir=linear.get("data_dir", "data"),
                backbone=linear["backbone"],
                image_size=linear.get("image_size") or 0,
                knn_limit=recipe.get("train_limit") or 0,
            )
            ref["offline"] = common.random_init_knn(
                a, device, ks=(20, 200), test_limit=recipe.get("test_limit") or 0, workers=workers
            )
    except common.UserError as e:
        return {"skipped": str(e)}
    return ref


def against_random_init(linear, metrics, ref):
    """[(measure, trained top-1, random-init top-1, test images)]: the linear probe's and kNN
    numbers of the trained backbone beside its random initialization's, measured the same way."""
    rows, off, on = [], ref.get("offline", {}), ref.get("online", {})
    key = "offline_linear_top1"
    if isinstance(linear.get(key), (int, float)) and key in off:
        rows.append(("offline linear probe top-1", linear[key], off[key], off["n_test"]))
    for k in (200, 20):
        key = f"knn_top1_k{k}"
        if isinstance(linear.get(key), (int, float)) and key in off:
            rows.append((f"offline kNN top-1 (k = {k})", linear[key], off[key], off["n_test"]))
    if metrics and "knn_top1" in metrics and "knn_top1_k200" in on:
        last = float(metrics["knn_top1"][1][-1])
        rows.append(("online kNN top-1 (last measured)", last, on["knn_top1_k200"], on["n_test"]))
    return rows


def verdict(rows):
    """(sentence, True / False / None): does the backbone beat its random initialization?"""
    if not rows:
        return "There is no kNN number to hold against the random initialization.", None
    above = [t > r for _, t, r, _ in rows]
    parts = [
        f"{what}: {100 * t:.1f} % against {100 * r:.1f} % at random init "
        f"({round((t - r) * n):+d} of {n:,} test images)"
        for what, t, r, n in rows
    ]
    if all(above):
        head, ok = "Yes: the backbone beats its random initialization", True
    elif not any(above):
        head, ok = "No: the backbone is not better than its random initialization", False
    else:
        head, ok = "Mixed: the backbone beats its random initialization on some measures only", None
    return f"{head}. " + "; ".join(parts) + ".", ok


def settings_text(saved, method):
    """One line on how a run was trained, from args.json."""
    if not saved:
        return "no args.json in the run folder"
    g = saved.get
    parts = [
        f"{method_title(saved, method) or 'a method script'} on {g('dataset', '?')}, "
        f"{g('backbone', '?')}",
        f"{g('epochs', '?')} epochs"
        + (f" of {g('steps_per_epoch')} steps" if g("steps_per_epoch") else ""),
        f"batch {g('batch_size', '?')}",
        f"Q-Score regularization λ = {g('qscore_lambda')}, "
        + (
            f"α = the batch's {g('qscore_alpha_quantile')} quantile"
            if g("qscore_alpha_quantile")
            else f"α = {g('qscore_alpha')}"
        )
        if g("qscore_lambda")
        else "no Q-Score regularization",
        f"spatial cross-attention ({g('xattn_clusters')} clusters, "
        f"{g('xattn_positives')} positives)"
        if g("xattn")
        else "no cross-attention",
    ]
    return ", ".join(parts)


def html_table(rows, header=None):
    """rows: (label as HTML, cells as HTML, how to read, or None for no such column)."""
    head = (
        "" if header is None else "<tr>" + "".join(f"<th>{prose(h)}</th>" for h in header) + "</tr>"
    )
    body = "".join(
        f"<tr><th>{label}</th>"
        + "".join(f"<td>{c}</td>" for c in cells)
        + ("" if how is None else f"<td class=hint>{prose(how)}</td>")
        + "</tr>"
        for label, cells, how in rows
    )
    return f"<table>{head}{body}</table>"


def number_table(rows, header=None, chance=None):
    """rows: (label, values, kind, how to read)."""
    return html_table(
        [
            (prose(label), [html.escape(show(v, kind)) for v in vals], hint(how, chance))
            for label, vals, kind, how in rows
        ],
        header and header + ["how to read"],
    )


def figure(out, name, caption):
    """A figure that exists, with its caption; nothing for one that does not. It is shown at
    96 CSS px per inch of the figure, so that its text has its size in points (8 pt: 10.7 px) at
    100 % zoom, and the page narrows a wider figure."""
    path = os.path.join(out, name)
    if not os.path.isfile(path):
        return ""
    with Image.open(path) as im:
        width = round(im.size[0] * 96 / DPI)
    return (
        f"<figure><img src='{html.escape(name)}' style='width:{width}px' "
        f"alt='{html.escape(caption.split('. ')[0])}'>"
        f"<figcaption>{prose(caption)}</figcaption></figure>"
    )


DETAILS = (
    "seconds",
    "figures",
    "classes",
    "accuracy",
    "features",
    "samples",
    "band",
    "features_shown",
)


def details_tables(sec, classes):
    """The lists of a section as tables: the discriminative band and its subsets, the classes of
    the features section, the chosen features of gradcam."""
    parts, e = [], html.escape
    if sec.get("accuracy"):
        parts.append(
            "<p>Top-1 of the probe on k features (one half of the evaluation split trains it, the "
            "other half scores it):</p>"
            + html_table(
                [
                    (
                        str(r["k"]),
                        [e(show(r[key], "pct")) for key in ("discriminative", "random", "pca")],
                        None,
                    )
                    for r in sec["accuracy"]
                ],
                ["features kept", "discriminative", "random", "PCA"],
            )
        )
    if isinstance(sec.get("classes"), dict):
        rows = [
            (
                c,
                [
                    e(show(v.get("n_correct"), "int")),
                    e(show(v.get("n_misclassified"), "int")),
                    e(show(v.get("mean_L_correct"), "f2")),
                    e(show(v.get("mean_L_misclassified"), "f2")),
                ],
                None,
            )
            for c, v in ((e(c), v) for c, v in sec["classes"].items())
        ]
        parts.append(
            "<details><summary>Per class: images and mean |L<sub>i</sub>|, correct and "
            "mis-classified</summary>"
            + html_table(
                rows,
                [
                    "class",
                    "correct images",
                    "mis-classified images",
                    "mean |L_i|, correct",
                    "mean |L_i|, mis-classified",
                ],
            )
            + "</details>"
        )
    if isinstance(sec.get("features"), dict):
        rows = []
        for j, f in sec["features"].items():
            share = f.get("class_share_percent") or [0.0]
            c = int(np.argmax(share))
            name = classes[c] if c < len(classes) else str(c)
            rows.append(
                (
                    f"feature {e(str(j))}",
                    [
                        e(show(f.get("A_j"), "pct100")),
                        e(f"{name} ({share[c]:.0f} % of its images)"),
                        e(", ".join(f.get("top_labels") or [])),
                    ],
                    None,
                )
            )
        parts.append(
            html_table(
                rows,
                [
                    "feature",
                    "A_j, all images",
                    "class it is most often highly activating for",
                    "classes of its top images",
                ],
            )
        )
    return parts


def section_numbers(name, sec, chance, classes):
    """The tables of one section: the layout of its PAGE dict, the lists as tables, then any
    number no layout names, in words, so that none is lost."""
    if "skipped" in sec:
        return f"<p class=note>Not computed: {html.escape(str(sec['skipped']))}.</p>"
    single, grids, used = [], [], set(DETAILS)
    for header, rows in PAGES[name]["tables"]:
        used.update(k for _, keys, _, _ in rows for k in keys)
        have = [
            (label, [sec.get(k) for k in keys], kind, how)
            for label, keys, kind, how in rows
            if any(k in sec for k in keys)
        ]
        if header is None:
            single += have
        elif have:
            grids.append(number_table(have, header, chance))
    single += [
        (number_label(k), [v], kind_of(k, v), NUMBERS[k][2] if k in NUMBERS else "")
        for k, v in sec.items()
        if k not in used and (isinstance(v, (int, float, str)) or v is None)
    ]
    single = [number_table(single, chance=chance)] if single else []
    return "".join(single + grids + details_tables(sec, classes))


COLORS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]  # matplotlib's C0-C9, which the figures use
STYLE = (
    "<style>body{font-family:sans-serif;max-width:1250px;margin:1em auto;padding:0 1em;color:#222;"
    "line-height:1.4}h2{margin-top:2em;border-bottom:1px solid #ccc}table{border-collapse:collapse;"
    "margin:.6em 0}th,td{padding:3px 10px;text-align:left;border-bottom:1px solid #eee;"
    "vertical-align:top}th{font-weight:600}td.hint{color:#666;font-size:.9em}td b{color:#060}"
    "figure{margin:1em 0}img{max-width:100%;border:1px solid #ccc}figcaption{font-size:.92em;"
    "color:#333;max-width:60em;margin-top:.3em}.note{color:#666}.nowrap{white-space:nowrap}"
    "details{margin:.6em 0}summary{cursor:pointer;color:#246}.verdict{padding:.6em 1em;"
    "border-left:6px solid #999;background:#f5f5f5;font-size:1.05em;margin:.8em 0}"
    ".verdict ul{margin:.3em 0;"
    "padding-left:1.4em}.yes{border-color:#2a7}"
    ".no{border-color:#c33}.mixed{border-color:#d90}.sub{color:#666;font-size:.85em}"
    "td b{color:#060}code{font-size:.95em}td{min-width:7em}</style>"
)


def folded_note(folded, saved=None):
    """The training quantities constant_keys left out of the figure, in words, with why."""
    if not folded:
        return ""
    g = (saved or {}).get
    parts = []
    for k, v in folded.items():
        kind = NUMBERS[k][1] if k in NUMBERS else "g3"
        why = ""
        if k == "qscore_under_alpha" and g("qscore_alpha_quantile"):
            why = (
                f" (α is each batch's {g('qscore_alpha_quantile')} quantile of Q_i, so this share "
                "is that quantile by construction)"
            )
        parts.append(f"{number_label(k)}: {show(v, kind)}{why}")
    return (
        "<p class=note>Not drawn, because they are the same in every epoch"
        + (" of every run" if saved is None else "")
        + ": "
        + prose("; ".join(parts))
        + ".</p>"
    )


def verdict_html(rows):
    sentence, ok = verdict(rows)
    cls = {True: "yes", False: "no", None: "mixed"}[ok]
    head, _, rest = sentence.partition(". ")
    items = "".join(f"<li>{prose(part)}</li>" for part in rest.rstrip(".").split("; ") if part)
    return f"<div class='verdict {cls}'><b>{prose(head)}.</b><ul>{items}</ul></div>"


def write_html(
    out,
    report,
    run_dir,
    training=None,
    metrics=None,
    saved=None,
    method="",
    classes=(),
):
    """index.html: the run and whether it beats its random initialization, its training curves,
    then each section with its words, numbers and figures. Only figures whose file exists are
    shown."""
    chance = 1 / len(classes) if classes else None
    name = os.path.basename(os.path.normpath(run_dir))
    title = page_title(saved, method, run_dir)
    ref = report.get("reference", {})
    run = [
        (number_label(k), [v], kind_of(k, v), NUMBERS[k][2] if k in NUMBERS else "")
        for k, v in report.get("run", {}).items()
        if not isinstance(v, (dict, list))
    ]
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{html.escape(title)}: what the backbone learned</title>",
        STYLE,
        f"<h1>{html.escape(title)}: what the backbone learned</h1>",
        f"<p>{html.escape(settings_text(saved or {}, method))}; run folder "
        f"<code>{html.escape(name)}</code>. This page is written by interpret.py from the run's "
        "backbone.pt and metrics.jsonl and from the predictions of eval_linear.py; every number "
        "on it is also in interpret.json.</p>",
        "<h2>Does the backbone beat its random initialization?</h2>",
        verdict_html(against_random_init(report.get("run", {}), metrics, ref)),
        "<p class=note>The reference is the same architecture with its seed-0 random weights and "
        "no training, measured exactly as the trained one (the same images, kNN bank and k, and "
        "eval_linear.py's same linear probe): a random ResNet is already a fair feature "
        "extractor on small images, so beating chance is not enough."
        + (f" Not measured here: {html.escape(ref['skipped'])}" if "skipped" in ref else "")
        + "</p>",
        number_table(run, chance=chance),
        f"<h2>{PAGE_TRAINING['title']}</h2><p>{prose(PAGE_TRAINING['intro'])}</p>",
    ]
    if training:
        parts.append(figure(out, training, PAGE_TRAINING["caption"]))
        parts.append(
            folded_note(
                constant_keys([(name, metrics)], training_keys([(name, metrics)])), saved or {}
            )
        )
    else:
        parts.append("<p class=note>No metrics.jsonl in the run folder, so no training curves.</p>")
    if metrics:
        rows = final_rows(
            [{"metrics": metrics, "linear": {}, "interpret": {}}], training_keys([(name, metrics)])
        )
        rows = [row[:4] for row in rows]
        if "online" in ref:
            rows.insert(
                next((i + 1 for i, r in enumerate(rows) if r[0].startswith("online kNN")), 1),
                (
                    number_label("random_init_online_knn_top1"),
                    [ref["online"]["knn_top1_k200"]],
                    "pct",
                    NUMBERS["random_init_online_knn_top1"][2],
                ),
            )
        parts.append(
            "<details><summary>The last epoch's numbers</summary>"
            + number_table(rows, chance=chance)
            + "</details>"
        )
    for sec_name in SECTIONS:
        if sec_name not in report:
            continue
        sec, page = report[sec_name], PAGES[sec_name]
        parts.append(f"<h2>{prose(page['title'])}</h2><p>{prose(page['intro'])}</p>")
        parts.append(section_numbers(sec_name, sec, chance, list(classes)))
        parts += [figure(out, f, page.get(f, "")) for f in sec.get("figures", [])]
        if isinstance(sec.get("seconds"), (int, float)) and "skipped" not in sec:
            parts.append(f"<p class=note>This section took {show(sec['seconds'], 'sec')}.</p>")
    with open(os.path.join(out, "index.html"), "w") as fh:
        fh.write("\n".join(parts))


# --- several runs side by side -----------------------------------------------------------
def run_labels(dirs):
    """Short names that tell the runs apart: the folder's name, or as many of the last path
    components as it takes."""
    parts = [os.path.normpath(os.path.abspath(d)).split(os.sep) for d in dirs]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = [os.sep.join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i + 1}: {d}" for i, d in enumerate(dirs)]  # the same folder twice


# What a rate is a share of, per run: (count, out of, noun) or None, e.g. (15, 360, "mistakes").
def _n_test(r):
    n = r["linear"].get("n_test")
    return (n, None, "test images") if n else None


def _n_online(r):
    n = r.get("reference", {}).get("online", {}).get("n_test")
    return (n, None, "test images") if n else None


def _n_mistakes(r):
    q = r["interpret"].get("qscore", {})
    n, share = q.get("n"), q.get("share_correct")
    m = q.get("n_misclassified", None if n is None or share is None else round(n * (1 - share)))
    return (m, n, "mistakes") if m is not None else None


def _n_qscore(r):
    n = r["interpret"].get("qscore", {}).get("n")
    return (n, None, "test images") if n else None


def _n_miou(r):
    n = r["interpret"].get("miou", {}).get("n_correct")
    return (n, None, "correct images with masks") if n else None


def _n_adai(r):
    n = r["interpret"].get("adai", {}).get("n_images")
    return (n, None, "images") if n else None


# The compare table after metrics.jsonl: (label, source, key, kind, how to read, +1 if higher is
# better, -1 if lower, 0 if neither, what a rate is a share of); a row no run has is left out.
COMPARE_FINAL = [
    (
        "offline linear probe, top-1",
        "linear",
        "offline_linear_top1",
        "pct",
        "{chance}higher is better",
        1,
        _n_test,
    ),
    (
        "offline linear probe, top-1, of the random-init backbone",
        "reference",
        "offline.offline_linear_top1",
        "pct",
        "the same architecture untrained (seed 0), the same probe: the bar to clear",
        0,
        _n_test,
    ),
    (
        "offline linear probe, top-5",
        "linear",
        "offline_linear_top5",
        "pct",
        "higher is better",
        1,
        _n_test,
    ),
    (
        "offline kNN top-1, k = 20",
        "linear",
        "knn_top1_k20",
        "pct",
        "{chance}higher is better",
        1,
        _n_test,
    ),
    (
        "offline kNN top-1, k = 200",
        "linear",
        "knn_top1_k200",
        "pct",
        "{chance}higher is better",
        1,
        _n_test,
    ),
    (
        "offline kNN top-1, k = 200, of the random-init backbone",
        "reference",
        "offline.knn_top1_k200",
        "pct",
        "the same architecture untrained (seed 0), measured the same way: the bar to clear",
        0,
        _n_test,
    ),
    (
        "Q-Score AUROC for the probe's outcome",
        "interpret",
        "qscore.auroc_correct_positive",
        "pct",
        "Kalibhat et al. Fig. 4; chance 50 %, higher is better; few mistakes make it noisy",
        1,
        _n_mistakes,
    ),
    (
        "Q-Score AUPRC, mistakes as positives",
        "interpret",
        "qscore.auprc_misclassified_positive",
        "pct",
        "chance: the share of mistakes; higher is better",
        1,
        _n_mistakes,
    ),
    (
        "mean |L_i|, all evaluation images",
        "interpret",
        "all.mean_L",
        "f2",
        "Kalibhat et al. Fig. 5 (left): rises with Q-Score regularization",
        1,
        _n_qscore,
    ),
    (
        "images with an empty L_i",
        "interpret",
        "qscore.share_empty_L",
        "pct",
        "|L_i| counts 0 there",
        0,
        _n_qscore,
    ),
    (
        "mean confidence of the probe, all evaluation images",
        "interpret",
        "all.mean_confidence",
        "pct",
        "Fig. 5 (right): rises with Q-Score regularization",
        1,
        _n_qscore,
    ),
    (
        "discriminative features (30th-85th percentile band)",
        "interpret",
        "discriminative.band_size",
        "int",
        "App. A.1",
        0,
        None,
    ),
    (
        "mIoU with core masks, correct images (all, as the paper)",
        "interpret",
        "miou.miou_core_correct",
        "pct",
        "Kalibhat et al. Fig. 8, over all N images (no heatmap counts 0); higher is better",
        1,
        _n_miou,
    ),
    (
        "mIoU with spurious masks, correct images (all, as the paper)",
        "interpret",
        "miou.miou_spurious_correct",
        "pct",
        "lower is better",
        -1,
        _n_miou,
    ),
    (
        "Average Drop",
        "interpret",
        "adai.average_drop",
        "pct100",
        "Seyfi et al. Table 4; lower is better",
        -1,
        _n_adai,
    ),
    (
        "Average Increase",
        "interpret",
        "adai.average_increase",
        "pct100",
        "Seyfi et al. Table 4; higher is better",
        1,
        _n_adai,
    ),
]
BETTER = {"knn_top1": 1}  # the training quantities with a direction worth ranking
MACHINE = ("images_per_s", "seconds", "peak_mem_gb")  # set by the machine and its load


def final_value(run, source, key):
    """A number of linear.json (source "linear"), of the run's random-init reference
    ("reference", key "offline.<name>") or of interpret.json ("interpret", key "section.key";
    "all.<quantity>": the mean over all evaluation images of a quantity that interpret.json gives
    for correct and mis-classified images, the population of Fig. 5)."""
    if source == "linear":
        v = run["linear"].get(key)
    elif source == "reference":
        part, name = key.split(".")
        v = run.get("reference", {}).get(part, {}).get(name)
    elif key.startswith("all."):
        q, name = run["interpret"].get("qscore", {}), key[4:]
        share, c, m = (
            q.get("share_correct"),
            q.get(f"{name}_correct"),
            q.get(f"{name}_misclassified"),
        )
        v = (
            None
            if share is None
            else c
            if m is None
            else m
            if c is None
            else share * c + (1 - share) * m
        )
    else:
        section, name = key.split(".")
        v = run["interpret"].get(section, {}).get(name)
    return v if isinstance(v, (int, float)) else None


def final_rows(runs, keys):
    """(label, values per run, kind, how to read, better, counts per run): the last epoch of each
    metrics.jsonl key (the last measured one for kNN; SUMMARY's over all epochs), the online
    random-init reference after the online kNN, then COMPARE_FINAL. Machine-dependent numbers
    (MACHINE) have no direction: they are never ranked."""
    none = [None] * len(runs)
    rows = [
        (
            "epochs trained",
            [r["metrics"]["epoch"][1][-1] if "epoch" in r["metrics"] else None for r in runs],
            "int",
            "",
            0,
            none,
        )
    ]
    for k in keys:
        label, agg = SUMMARY.get(
            k,
            (
                number_label(k) + (", last measured" if k == "knn_top1" else ", last epoch"),
                lambda v: v[-1],
            ),
        )
        vals = [float(agg(r["metrics"][k][1])) if k in r["metrics"] else None for r in runs]
        kind, how = NUMBERS[k][1:] if k in NUMBERS else ("g3", "")
        if k in MACHINE:
            how = (how + "; " if how else "") + "depends on the machine and its load: not ranked"
        counts = [_n_online(r) for r in runs] if k == "knn_top1" else none
        rows.append((label, vals, kind, how, BETTER.get(k, 0), counts))
        if k == "knn_top1":
            ref = [r.get("reference", {}).get("online", {}).get("knn_top1_k200") for r in runs]
            if any(v is not None for v in ref):
                label, kind, how = NUMBERS["random_init_online_knn_top1"]
                rows.append((label, ref, kind, how, 0, counts))
    for label, source, key, kind, how, better, count in COMPARE_FINAL:
        vals = [final_value(r, source, key) for r in runs]
        if any(v is not None for v in vals):
            counts = [count(r) if count else None for r in runs]
            rows.append((label, vals, kind, how, better, counts))
    return rows


def count_text(counts):
    """What a rate is a share of, for one run or over a group's runs: "on 15 mistakes of 360",
    "on 12-15 mistakes of 360"; "" when unknown."""
    have = [c for c in counts if c and c[0] is not None]
    if not have:
        return ""
    ns, of = sorted({c[0] for c in have}), sorted({c[1] for c in have if c[1]})
    n = f"{ns[0]:,}" if len(ns) == 1 else f"{ns[0]:,}-{ns[-1]:,}"
    total = "" if not of else f" of {of[0]:,}" if len(of) == 1 else f" of {of[0]:,}-{of[-1]:,}"
    return f"on {n} {have[0][2]}{total}"


def seed_groups(runs):
    """Lists of run indices: runs of one method whose args.json differ in --seed only (and in
    flags that do not change what is computed, IGNORED_FLAGS) form a group, in the order of their
    first run. A run without args.json is a group of its own."""
    groups = {}
    for i, r in enumerate(runs):
        key = r["dir"]
        if r["saved"]:
            flags = {k: v for k, v in r["saved"].items() if k not in IGNORED_FLAGS + ("seed",)}
            key = json.dumps([method_title(r["saved"], r["method"]), flags], sort_keys=True)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def group_stats(vals):
    """Mean, smallest, largest and number of the values that exist; None when none does."""
    have = [float(v) for v in vals if isinstance(v, (int, float))]
    if not have:
        return None
    return {"mean": float(np.mean(have)), "min": min(have), "max": max(have), "n": len(have)}


def better_group(stats, better):
    """The index of the group whose every seed beats every seed of every other group in the
    row's direction: the difference exceeds the seed range. None when there is no direction, or
    fewer than two groups have the number, or any of them has fewer than two seeds (no noise
    estimate: then nothing is ranked), or the ranges overlap."""
    have = [(i, st) for i, st in enumerate(stats) if st]
    if not better or len(have) < 2 or any(st["n"] < 2 for _, st in have):
        return None
    for i, st in have:
        others = [o for j, o in have if j != i]
        if better > 0 and all(st["min"] > o["max"] for o in others):
            return i
        if better < 0 and all(st["max"] < o["min"] for o in others):
            return i
    return None


def group_cell(st, kind, count, bold):
    """A group's number as a table cell: the mean, and under it the seed range and the count."""
    if st is None:
        return "<td>–</td>"
    main = html.escape(show(st["mean"], kind))
    main = f"<b title='better beyond the seed range'>{main}</b>" if bold else main
    sub = []
    if st["n"] > 1:
        lo, hi = show(st["min"], kind), show(st["max"], kind)
        sub.append(f"{st['n']} seeds: {lo} to {hi}" if lo != hi else f"{st['n']} seeds, all {lo}")
    if count:
        sub.append(count)
    return (
        f"<td>{main}"
        + "".join(f"<br><span class=sub>{html.escape(t)}</span>" for t in sub)
        + "</td>"
    )


def compare(args):
    """interpret.py --compare RUN [RUN ...]: training curves on shared axes and a table of the
    final numbers, runs that differ only in --seed gathered into one column (mean and range),
    into OUT/index.html (and compare.json: what the figure drew, the groups and the table)."""
    dirs = ([args.run_dir] if args.run_dir else []) + list(args.compare)
    for d in dirs:
        if not os.path.isdir(d):
            raise common.UserError(f"--compare: run folder '{d}' does not exist.")
        if not any(os.path.isfile(os.path.join(d, f)) for f in ("metrics.jsonl", "linear.json")):
            raise common.UserError(
                f"--compare: '{d}' has neither metrics.jsonl nor linear.json: is it a run folder?"
            )
    out = args.out or os.path.join("runs", f"compare_{int(time.time())}")
    os.makedirs(out, exist_ok=True)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    runs = []
    for d, label in zip(dirs, run_labels(dirs)):
        page = os.path.join(d, "interpret", "index.html")
        saved, linear = (
            read_json(os.path.join(d, "args.json")),
            read_json(os.path.join(d, "linear.json")),
        )
        runs.append(
            {
                "label": label,
                "dir": d,
                "metrics": read_metrics(d),
                "method": run_method(d),
                "saved": saved,
                "linear": linear,
                "interpret": read_json(os.path.join(d, "interpret", "interpret.json")),
                "reference": {} if args.no_reference else references(saved, linear, device),
                "page": os.path.relpath(page, out) if os.path.isfile(page) else "",
            }
        )
    groups = seed_groups(runs)
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    glabels = []
    for members in groups:
        names = [runs[i]["label"] for i in members]
        glabels.append(
            " + ".join(names) if len(names) <= 3 else f"{names[0]} and {len(names) - 1} more"
        )
    seeds = [[runs[i]["saved"].get("seed") for i in members] for members in groups]
    online = {}  # random-init online kNN value -> labels of the runs it is the reference of
    for r in runs:
        v = r["reference"].get("online", {}).get("knn_top1_k200")
        if v is not None:
            online.setdefault(v, []).append(r["label"])
    lines = [
        (v, "random init" if len(online) == 1 else f"random init ({', '.join(names)})")
        for v, names in online.items()
    ]
    series = [(r["label"], r["metrics"]) for r in runs]
    curves = training_figure(
        series,
        os.path.join(out, "training.png"),
        references={"knn_top1": lines},
        colors=[group_of[i] for i in range(len(runs))],
    )
    rows = final_rows(runs, training_keys(series))
    n_classes = {len(r["linear"]["classes"]) for r in runs if r["linear"].get("classes")}
    chance = 1 / n_classes.pop() if len(n_classes) == 1 else None

    flags = sorted({k for r in runs for k in r["saved"]} - set(IGNORED_FLAGS))
    differ = [k for k in flags if len({json.dumps(r["saved"].get(k)) for r in runs}) > 1]
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{len(runs)} runs side by side</title>",
        STYLE,
        f"<h1>{len(runs)} runs side by side</h1>",
        "<p>The training curves of each run from its metrics.jsonl, then its final numbers, from "
        "metrics.jsonl, from linear.json (eval_linear.py) and from interpret/interpret.json "
        "(interpret.py) where these exist. A dash marks a number a run does not have. Every number "
        "is also in compare.json.</p>",
        "<table><tr><th>run</th><th>folder</th><th>how it was trained</th><th>flags that "
        "differ</th><th>beats its random init (linear probe, kNN)?</th><th>page</th></tr>",
    ]
    for c, r in enumerate(runs):
        diff = (
            " ".join(f"--{k.replace('_', '-')} {r['saved'].get(k, '–')}" for k in differ) or "none"
        )
        link = f"<a href='{html.escape(r['page'])}'>interpret page</a>" if r["page"] else "–"
        swatch = f"<span style='color:{COLORS[group_of[c] % 10]}'>■</span>"  # colour in the figure
        sentence, ok = verdict(against_random_init(r["linear"], r["metrics"], r["reference"]))
        beats = {True: "yes", False: "no", None: "mixed" if "Mixed" in sentence else "–"}[ok]
        parts.append(
            f"<tr><th class=nowrap>{swatch} {html.escape(r['label'])}</th><td>"
            f"{html.escape(r['dir'])}</td><td>"
            f"{html.escape(settings_text(r['saved'], r['method']))}</td><td class=nowrap>"
            f"{html.escape(diff)}</td><td title='{html.escape(sentence)}'>{beats}</td>"
            f"<td class=nowrap>{link}</td></tr>"
        )
    parts.append("</table>")
    parts.append(f"<h2>{PAGE_TRAINING['title']}</h2>")
    if curves:
        parts.append(figure(out, "training.png", PAGE_TRAINING["compare"]))
        parts.append(folded_note(constant_keys(series, training_keys(series))))
    else:
        parts.append(
            "<p class=note>None of the runs has a metrics.jsonl, "
            "so there are no training curves.</p>"
        )
    several = any(len(m) > 1 for m in groups)
    parts.append(
        "<h2>Final numbers</h2><p>The last epoch of training, then the offline evaluation and the "
        "analyses of the finished backbones. "
        + (
            "Runs that differ only in --seed share a column: its number is their mean, with the "
            "range over the seeds under it. "
            if several
            else "Each run is one seed, so nothing tells the seed-to-seed noise apart from a real "
            "difference: no number is marked better. "
        )
        + "A number is in bold only where its group is better than every other group beyond the "
        "seed range (its worst seed beats their best), which needs two or more seeds in every "
        "group; speed, time and memory depend on the machine and its load and are never "
        "ranked. Under each rate: what it is a share of (a few mistakes make an AUROC noisy).</p>"
    )
    head = (
        "<tr><th></th>"
        + "".join(
            f"<th><span style='color:{COLORS[g % 10]}'>■</span> {html.escape(glabels[g])}"
            + (
                f"<br><span class=sub>seeds {html.escape(', '.join(map(str, seeds[g])))}</span>"
                if len(groups[g]) > 1
                else ""
            )
            + "</th>"
            for g in range(len(groups))
        )
        + "<th>how to read</th></tr>"
    )
    body, table = [], []
    for label, vals, kind, how, better, counts in rows:
        stats = [group_stats([vals[i] for i in members]) for members in groups]
        best = better_group(stats, better)
        cells = "".join(
            group_cell(st, kind, count_text([counts[i] for i in members]), g == best)
            for g, (st, members) in enumerate(zip(stats, groups))
        )
        body.append(
            f"<tr><th>{prose(label)}</th>{cells}<td class=hint>{prose(hint(how, chance))}</td></tr>"
        )
        table.append(
            {
                "label": label,
                "values": dict(zip([r["label"] for r in runs], vals)),
                "counts": {r["label"]: count_text([c]) for r, c in zip(runs, counts) if c},
                "groups": dict(zip(glabels, stats)),
                "better": None if best is None else glabels[best],
                "ranked": bool(better),
            }
        )
    parts.append(f"<table>{head}{''.join(body)}</table>")
    with open(os.path.join(out, "index.html"), "w") as fh:
        fh.write("\n".join(parts))
    with open(os.path.join(out, "compare.json"), "w") as fh:
        json.dump(
            {
                "runs": [
                    {
                        "label": r["label"],
                        "run_dir": r["dir"],
                        "method": r["method"],
                        "group": glabels[group_of[i]],
                        "reference": r["reference"],
                    }
                    for i, r in enumerate(runs)
                ],
                "groups": [
                    {"label": glabels[g], "runs": [runs[i]["label"] for i in m], "seeds": seeds[g]}
                    for g, m in enumerate(groups)
                ],
                "curves": curves,
                "final": table,
            },
            fh,
            indent=2,
        )
    print(
        f"compared {len(runs)} runs in {len(groups)} group(s) of runs that differ only in --seed"
        f" -> {os.path.join(out, 'index.html')}",
        flush=True,
    )
    return 0


def pct(v):
    return show(v, "pct")


def summary_lines(report, metrics, title, ran):
    """What the terminal says at the end: whether the backbone beats its random initialization,
    the probe, and a sentence for each section that ran (`ran`), without raw keys."""
    import textwrap

    run, ref = report.get("run", {}), report.get("reference", {})
    lines = [f"{title}: what the backbone learned"]
    sentence, _ = verdict(against_random_init(run, metrics, ref))
    lines.append("  " + sentence)
    if "skipped" in ref:
        lines.append(f"  (no random-init reference: {ref['skipped']})")
    if "offline_linear_top1" in run:
        n = f" on {run['n_test']:,} test images" if run.get("n_test") else ""
        lines.append(f"  offline linear probe: top-1 {pct(run['offline_linear_top1'])}{n}")
    for name in ran:
        sec = report.get(name, {})
        if "skipped" in sec:
            lines.append(f"  {name}: not computed ({sec['skipped']})")
        elif name == "qscore":
            auroc = sec.get("auroc_correct_positive")
            lines.append(
                f"  Q-Score: AUROC {pct(auroc)} as a predictor of the probe's "
                f"{sec.get('n_misclassified', '?')} mistakes of {sec['n']:,} images (chance 50 %); "
                f"{pct(sec['share_empty_L'])} of the images have an empty L_i"
            )
        elif name == "features":
            lines.append(
                f"  mean representations: {sec['n_classes_shown']} classes by "
                f"{sec['n_features_shown']} features drawn"
            )
        elif name == "discriminative":
            lines.append(
                f"  discriminative features: {sec['band_size']} of the "
                f"{sec['n_active_features']} features that are highly activating at least once"
            )
        elif name == "gradcam":
            lines.append(
                f"  Grad-CAM: {len(sec.get('samples', []))} images and features "
                f"{sec.get('features_chosen', '')}"
            )
        elif name == "miou":
            lines.append(
                f"  mIoU over all {sec['n_images']} images with masks (the paper's form), correct "
                f"images: core {pct(sec.get('miou_core_correct'))}, spurious "
                f"{pct(sec.get('miou_spurious_correct'))}; over the "
                f"{pct(sec.get('share_with_heatmap_correct'))} of them with a heatmap: core "
                f"{pct(sec.get('miou_core_correct_with_heatmap'))}, spurious "
                f"{pct(sec.get('miou_spurious_correct_with_heatmap'))}"
            )
        elif name == "adai":
            lines.append(
                f"  Average Drop {sec['average_drop']:.1f} %, Average Increase "
                f"{sec['average_increase']:.1f} % on {sec['n_images']} images"
            )
    return [
        wrapped
        for line in lines
        for wrapped in textwrap.wrap(line, 100, subsequent_indent="    ", break_on_hyphens=False)
    ]


def main(args):
    if args.compare:
        return compare(args)
    if not args.run_dir:
        raise common.UserError(
            "name a run folder (interpret.py RUN_DIR), or runs to compare (--compare RUN RUN ...)."
        )
    ctx = load_inputs(args)
    out = ctx["out"]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "interpret.json")
    report = {}
    if os.path.isfile(path):  # a section run alone keeps the others' results
        with open(path) as fh:
            report = json.load(fh)
    saved, lin = read_json(os.path.join(args.run_dir, "args.json")), ctx["linear"]
    if not args.no_reference:
        print(
            "random-init reference: the untrained architecture's kNN (cached) and eval_linear.py's "
            "probe of it (linear.json)",
            flush=True,
        )
    ref = {} if args.no_reference else references(saved, lin, ctx["device"])
    off = ref.get("offline", {})
    report["reference"] = ref
    report["run"] = {
        "run_dir": args.run_dir,
        "dataset": args.dataset,
        "image_size": ctx["size"],
        "eps": args.eps,
        **{
            k: v
            for k, v in (
                ("offline_linear_top1", lin.get("offline_linear_top1")),
                ("random_init_offline_linear_top1", off.get("offline_linear_top1")),
                ("offline_linear_top5", lin.get("offline_linear_top5")),
                ("knn_top1_k20", lin.get("knn_top1_k20")),
                ("random_init_knn_top1_k20", off.get("knn_top1_k20")),
                ("knn_top1_k200", lin.get("knn_top1_k200")),
                ("random_init_knn_top1_k200", off.get("knn_top1_k200")),
                ("n_train", lin.get("n_train")),
                ("n_test", lin.get("n_test")),
                ("random_init_online_knn_top1", ref.get("online", {}).get("knn_top1_k200")),
            )
            if v is not None
        },
    }
    runners = {
        "qscore": section_qscore,
        "features": section_features,
        "discriminative": section_discriminative,
        "gradcam": lambda c: section_gradcam(c, args),
        "miou": lambda c: section_miou(c, args),
        "adai": lambda c: section_adai(c, args),
    }
    ran = [name for name in SECTIONS if name in ctx["only"]]
    for i, name in enumerate(ran):
        t0 = time.time()
        num, files = runners[name](ctx)
        report[name] = {**num, "seconds": time.time() - t0, "figures": files}
        took = "skipped" if "skipped" in num else f"{time.time() - t0:.1f} s"
        print(f"[{i + 1}/{len(ran)}] {name}: {took}", flush=True)
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)
    metrics = read_metrics(args.run_dir)
    training = None
    if metrics:
        training = "training.png"
        online = ref.get("online", {}).get("knn_top1_k200")
        training_figure(
            [(os.path.basename(os.path.normpath(args.run_dir)), metrics)],
            os.path.join(out, training),
            references={"knn_top1": [(online, "random init")]} if online is not None else {},
        )
    method = run_method(args.run_dir)
    write_html(out, report, args.run_dir, training, metrics, saved, method, ctx["classes"])
    print("\n".join(summary_lines(report, metrics, page_title(saved, method, args.run_dir), ran)))
    print(f"-> {os.path.join(out, 'index.html')} (every number in interpret.json)", flush=True)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main(parse_args()))
    except common.UserError as e:
        common.fail(str(e))
