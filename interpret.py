"""What did a self-supervised backbone learn, and why does its linear probe fail where it fails?

Reads a run folder (backbone.pt, args.json) and what eval_linear.py wrote (predictions.npz,
linear_head.pt, linear.json), and writes figures (PNG), interpret.json and an index.html that
shows every figure with its numbers. Six sections, each of which can run alone (--only):

  qscore          Q-Score as a label-free predictor of correct classification: AUROC, AUPRC
                  (correct as positive, and mis-classified as positive), ROC and PR curves;
                  mean |L_i| and confidence of correct vs mis-classified samples.
                  Kalibhat et al., "Understanding Representation Quality in Self-Supervised
                  Models" (the Q-Score paper), Sec. 4, Fig. 4 and 5.
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

Masks (--masks DIR) follow the Salient ImageNet layout (Singla & Feizi 2022):
    DIR/features.csv                                  header `class,feature,kind`, kind: core | spurious
    DIR/<class>/feature_<k>/<image>.<JPEG|jpg|png>    grayscale, 0-255, one mask per (class, feature)
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
import time

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image

import common

SECTIONS = ("qscore", "features", "discriminative", "gradcam", "miou", "adai")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run folder of a method script (backbone.pt, args.json)")
    p.add_argument("--predictions", default="", help="folder of eval_linear.py's outputs (default: RUN_DIR)")
    p.add_argument("--out", default="", help="output folder (default: RUN_DIR/interpret)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--masks", default="", help="core/spurious masks in the Salient ImageNet layout (see above); miou needs it")
    p.add_argument("--max-images", type=int, default=256, help="images that gradcam, miou and adai run the backbone on")
    p.add_argument("--features", default="", help="features to show in gradcam, e.g. 12,301; default: 4 picked from the band")
    p.add_argument("--eps", type=float, default=3.0, help="highly activating: h_ij > mu_i + eps sigma_i (Eq. 2; paper: 3)")
    p.add_argument("--dataset", default=None, choices=common.DATASETS, help="default: linear.json, else args.json")
    p.add_argument("--data-dir", default=None, help="default: linear.json, else args.json")
    p.add_argument("--image-size", type=int, default=None, help="default: linear.json, else args.json; 0: native")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when there is one")
    return p.parse_args(argv)


# --- the measures: small pure functions --------------------------------------------------
def qscore(h, eps=3.0):
    """Q-Score (Kalibhat et al., Eq. 2 and 3), in numpy; the same definition as the method
    scripts' `qscore`. h (N, D) pooled representations, L2-normalized here.
    L_i = {j : h_ij > mu_i + eps sigma_i} (population std); Q_i = mean_{j in L_i} (h_ij - mu_i);
    an empty L_i becomes the single largest feature. Returns Q (N,) and the mask of L (N, D)."""
    h = np.asarray(h, dtype=np.float32)
    h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
    mu, sigma = h.mean(1, keepdims=True), h.std(1, keepdims=True)  # (N, 1)
    mask = h > mu + eps * sigma
    empty = ~mask.any(1)
    mask[empty, h[empty].argmax(1)] = True
    q = ((h - mu) * mask).sum(1) / mask.sum(1)
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
    return {"auroc": auroc, "auprc": auprc, "fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall}


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
    return order[start:start + k]


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
        raise common.UserError(f"no backbone at '{weights}': '{args.run_dir}' is not a finished run of a method script.")
    pred_dir = args.predictions or args.run_dir
    path = os.path.join(pred_dir, "predictions.npz")
    if not os.path.isfile(path):
        raise common.UserError(f"no predictions at '{path}': run eval_linear.py {args.run_dir} first.")
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
        raise common.UserError("neither linear.json nor args.json names the data set: pass --dataset.")
    if args.masks and not os.path.isfile(os.path.join(args.masks, "features.csv")):
        raise common.UserError(f"--masks '{args.masks}' has no features.csv (the layout is in interpret.py --help).")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise common.UserError("--device cuda was asked for, but no GPU is visible.")

    p = dict(np.load(path))
    native = common.IMAGE_SIZE[args.dataset]
    size = args.image_size or native
    name = linear.get("backbone", saved.get("backbone", "resnet18"))
    backbone = common.build_backbone(name, size <= 64, weights)  # a stem that does not fit the size fails here
    if p["h"].shape[1] != backbone.dim:
        raise common.UserError(f"'{path}' holds {p['h'].shape[1]}-wide representations, but the {name} gives "
                               f"{backbone.dim}: run eval_linear.py {args.run_dir} again.")
    dataset = common.make_dataset(args.dataset, args.data_dir, train=False, download=False)
    targets = np.asarray(dataset.targets)
    if p["index"].max() >= len(dataset) or not np.array_equal(targets[p["index"]], p["label"]):
        raise common.UserError(f"'{path}' does not describe the evaluation split of {args.dataset} at "
                               f"'{args.data_dir}' ({len(dataset)} images): run eval_linear.py on it first.")
    head_path = os.path.join(pred_dir, "linear_head.pt")
    head, head_mean, head_std, d = None, None, None, backbone.dim
    if "adai" in only:
        if not os.path.isfile(head_path):
            raise common.UserError(f"adai needs the linear head at '{head_path}': run eval_linear.py first.")
        saved_head = torch.load(head_path, map_location="cpu", weights_only=True)
        w = saved_head["state_dict"]["weight"]
        if w.shape != (len(dataset.classes), backbone.dim):
            raise common.UserError(f"'{head_path}' maps {w.shape[1]} features to {w.shape[0]} classes, but the backbone "
                                   f"gives {backbone.dim} and {args.dataset} has {len(dataset.classes)} classes.")
        head = nn.Linear(w.shape[1], w.shape[0])
        head.load_state_dict(saved_head["state_dict"])
        head_mean = torch.zeros(d) if saved_head.get("mean") is None else saved_head["mean"].float()
        head_std = torch.ones(d) if saved_head.get("std") is None else saved_head["std"].float()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    q, mask = qscore(p["h"], args.eps)
    return dict(only=only, eps=args.eps, p=p, q=q, mask=mask, a=activation_share(mask), linear=linear,
                backbone=backbone.to(device).eval(), head=head, head_mean=head_mean, head_std=head_std, dataset=dataset,
                classes=[str(c) for c in dataset.classes], size=size, native=native, stats=common.STATS[args.dataset],
                device=device, out=args.out or os.path.join(args.run_dir, "interpret"))


def load_images(ctx, rows):
    """The eval-transformed images of prediction rows `rows`: (B, 3, s, s) on the device."""
    tf = common.eval_transform(ctx["size"], ctx["stats"], ctx["native"])
    idx = ctx["p"]["index"][rows]
    return torch.stack([tf(ctx["dataset"][int(i)][0].convert("RGB")) for i in idx]).to(ctx["device"])


def sample_rows(ctx, max_images):
    """A fixed random choice (seed 0) of at most max_images prediction rows, in random order, so
    that the figures' first images mix classes (ImageFolder data sets are sorted by class)."""
    return np.random.RandomState(0).permutation(len(ctx["q"]))[:max_images]


def heatmaps_of_l(ctx, rows, batch=64):
    """Grad-CAM of the sum of each image's highly activating features (L_i from the backbone's
    h on these very images), (B, s, s) numpy."""
    out = []
    for s in range(0, len(rows), batch):
        x = load_images(ctx, rows[s:s + batch])
        with torch.no_grad():
            h = ctx["backbone"](x)[1]
        l_mask = torch.as_tensor(qscore(h.cpu().numpy(), ctx["eps"])[1], device=x.device)
        out.append(common.grad_cam(ctx["backbone"], x, l_mask).cpu().numpy())
    return np.concatenate(out)


def to_rgb(ctx, x):
    m, s = (np.array(v).reshape(3, 1, 1) for v in ctx["stats"])
    return np.clip(x.cpu().numpy() * s + m, 0, 1).transpose(1, 2, 0)  # (s, s, 3)


# --- the sections: each returns (numbers, figure files) ---------------------------------
def plt_figure(*a, **k):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt, plt.figure(*a, **k)


def save(plt, fig, ctx, name):
    fig.tight_layout()
    fig.savefig(os.path.join(ctx["out"], name), dpi=90)
    plt.close(fig)
    return name


def section_qscore(ctx):
    p, q, correct = ctx["p"], ctx["q"], ctx["p"]["correct"].astype(bool)
    cur = {"correct": binary_curves(q, correct), "misclassified": binary_curves(-q, ~correct)}  # low Q predicts errors
    size = ctx["mask"].sum(1)
    num = {"n": len(q), "share_correct": float(correct.mean())}
    for name, c in cur.items():
        num[f"auroc_{name}_positive"], num[f"auprc_{name}_positive"] = c["auroc"], c["auprc"]
    for name, sel in (("correct", correct), ("misclassified", ~correct)):
        num[f"mean_L_{name}"] = float(size[sel].mean()) if sel.any() else None
        num[f"mean_confidence_{name}"] = float(p["confidence"][sel].mean()) if sel.any() else None
        num[f"mean_q_{name}"] = float(q[sel].mean()) if sel.any() else None
    plt, fig = plt_figure(figsize=(10, 4))
    ax1, ax2 = fig.add_subplot(121), fig.add_subplot(122)
    for name, c in cur.items():
        if c["auroc"] is not None:
            ax1.plot(c["fpr"], c["tpr"], label=f"{name} positive (AUROC {100 * c['auroc']:.1f})")
            ax2.plot(c["recall"], c["precision"], label=f"{name} positive (AUPRC {100 * c['auprc']:.1f})")
    ax1.plot([0, 1], [0, 1], "k:", lw=1)
    ax1.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC of Q-Score")
    ax2.axhline(correct.mean(), color="C0", ls=":", lw=1)
    ax2.axhline(1 - correct.mean(), color="C1", ls=":", lw=1)
    ax2.set(xlabel="recall", ylabel="precision", title="precision-recall of Q-Score (dotted: chance)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    files = [save(plt, fig, ctx, "qscore_curves.png")]
    plt, fig = plt_figure(figsize=(11, 3.5))
    for i, (key, label) in enumerate((("mean_L", "mean |L_i|"), ("mean_confidence", "mean confidence"))):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.bar(["correct", "mis-classified"], [num[f"{key}_correct"] or 0, num[f"{key}_misclassified"] or 0], color=["C0", "C1"])
        ax.set_title(label)
    ax = fig.add_subplot(133)
    bins = np.linspace(q.min(), q.max(), 40)
    ax.hist(q[correct], bins, alpha=0.6, density=True, label="correct")
    ax.hist(q[~correct], bins, alpha=0.6, density=True, label="mis-classified")
    ax.set(title="Q-Score", xlabel="Q_i")
    ax.legend(fontsize=8)
    files.append(save(plt, fig, ctx, "qscore_bars.png"))
    return num, files


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
    num = {"n_classes_shown": len(shown), "n_features_shown": len(cols), "features_shown": [int(j) for j in cols],
           "classes": {}}
    for r, c in enumerate(shown):
        row = {}
        for k, sel in (("correct", (label == c) & correct), ("misclassified", (label == c) & ~correct)):
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
        ax.set_yticks(range(len(shown)), [classes[c][:12] for c in shown], fontsize=7)
        ax.set_xticks(range(len(cols)), cols, fontsize=5, rotation=90)
        ax.set_title(f"{k}: mean of normalized h (blank: no sample)", fontsize=9)
    fig.colorbar(im, ax=fig.axes)
    fig.savefig(os.path.join(ctx["out"], "features_heatmap.png"), dpi=90, bbox_inches="tight")
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


def section_discriminative(ctx):
    """Fig. A.1 and A.3. The probe trains on a fixed half of the evaluation split and is scored
    on the other half: the comparison between subsets is what counts, not the absolute top-1."""
    from sklearn.decomposition import PCA
    a, h, y = ctx["a"], ctx["p"]["h"].astype(np.float64), ctx["p"]["label"]
    d, band = len(a), discriminative_band(a)
    perm = np.random.RandomState(0).permutation(len(y))
    train, test = perm[: len(y) // 2], perm[len(y) // 2:]
    sizes = sorted({len(band), *[k for k in (d // 32, d // 16, d // 8, d // 4, d // 2) if k >= 2], d})
    rng = np.random.RandomState(1)
    rows = []
    for k in sizes:
        # k components of k or more training samples are partly noise that standardizing blows up: none
        pca = PCA(k, random_state=0).fit(h[train]) if k < len(train) else None
        rows.append({"k": int(k), "discriminative": probe_accuracy(h[:, discriminative_subset(a, k)], y, train, test),
                     "random": probe_accuracy(h[:, np.sort(rng.choice(d, k, replace=False))], y, train, test),
                     "pca": probe_accuracy(pca.transform(h), y, train, test) if pca is not None else None})
    active = np.sort(a[a > 0])
    num = {"n_active_features": int((a > 0).sum()), "band_size": int(len(band)),
           "band_A_range": [float(a[band].min()), float(a[band].max())], "band": [int(j) for j in band],
           "probe": "logistic regression, half of the eval split -> the other half", "accuracy": rows}
    plt, fig = plt_figure(figsize=(11, 4))
    ax = fig.add_subplot(121)
    ax.plot(active, lw=1.5)
    lo, hi = np.searchsorted(active, [a[band].min(), a[band].max()], side="left")
    ax.axvspan(lo, hi, color="C2", alpha=0.2, label=f"30th-85th percentile: {len(band)} features")
    ax.set(xlabel="highly activating features, ascending A_j", ylabel="A_j (% of samples)", title="A_j (Eq. 5)")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(122)
    for key in ("discriminative", "random", "pca"):
        have = [r for r in rows if r[key] is not None]
        ax.plot([r["k"] for r in have], [100 * r[key] for r in have], "o-", label=key)
    ax.axvline(len(band), color="C2", ls=":", lw=1, label=f"the band ({len(band)})")
    ax.set(xscale="log", xlabel="features kept", ylabel="top-1 (%)", title="linear probe on feature subsets")
    ticks = [r["k"] for r in rows if r["k"] != len(band)]
    ax.set_xticks(ticks, [str(k) for k in ticks], fontsize=7)
    ax.minorticks_off()
    ax.legend(fontsize=8)
    return num, [save(plt, fig, ctx, "discriminative.png")]


def overlay(ax, rgb, heat, title):
    ax.imshow(rgb)
    ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def section_gradcam(ctx, args, per_kind=8, top_images=6):
    p, q, a, mask, classes = ctx["p"], ctx["q"], ctx["a"], ctx["mask"], ctx["classes"]
    correct = p["correct"].astype(bool)
    pool = sample_rows(ctx, args.max_images)
    rows = np.r_[pool[correct[pool]][:per_kind], pool[~correct[pool]][:per_kind]]
    heat, x = heatmaps_of_l(ctx, rows), load_images(ctx, rows)
    plt, fig = plt_figure(figsize=(2 * min(len(rows), per_kind), 4.4))
    for i, r in enumerate(rows):
        kind = "correct" if correct[r] else "wrong"
        col = i if correct[r] else i - (correct[rows]).sum()
        ax = fig.add_subplot(2, per_kind, (0 if correct[r] else per_kind) + col + 1)
        overlay(ax, to_rgb(ctx, x[i]), heat[i], f"{kind}: {classes[p['label'][r]][:8]}->{classes[p['prediction'][r]][:8]}\n"
                f"|L|={mask[r].sum()} Q={q[r]:.3f}")
    files = [save(plt, fig, ctx, "gradcam_samples.png")]

    # Fig. 2: per-class share of samples for which a feature is highly activating
    label, n_cls = p["label"], len(classes)
    hist = np.stack([mask[label == c].mean(0) * 100 if (label == c).any() else np.zeros(mask.shape[1])
                     for c in range(n_cls)])  # (C, D)
    if args.features:
        try:
            chosen = [int(j) for j in args.features.split(",")]
        except ValueError:
            raise common.UserError(f"--features {args.features}: give feature indices like 12,301.") from None
        if max(chosen) >= mask.shape[1] or min(chosen) < 0:
            raise common.UserError(f"--features {args.features}: the representation has {mask.shape[1]} features.")
    else:  # the band's features most tied to one class
        band = discriminative_band(a)
        chosen = [int(j) for j in band[np.argsort(-hist[:, band].max(0), kind="stable")][:4]]
    hn = p["h"] / np.maximum(np.linalg.norm(p["h"], axis=1, keepdims=True), 1e-12)
    plt, fig = plt_figure(figsize=(2 * (top_images + 2), 2.2 * len(chosen)))
    grid = fig.add_gridspec(len(chosen), top_images + 2)
    samples = [{"index": int(p["index"][r]), "correct": bool(correct[r]), "L": int(mask[r].sum()), "q": float(q[r])}
               for r in rows]
    num = {"features_chosen": ",".join(map(str, chosen)), "samples": samples, "features": {}}
    for f_i, j in enumerate(chosen):
        top = np.argsort(-hn[:, j])[:top_images]
        top = top[np.argsort(label[top], kind="stable")]  # grouped by class
        xj = load_images(ctx, top)
        hj = common.grad_cam(ctx["backbone"], xj, j).cpu().numpy()
        ax = fig.add_subplot(grid[f_i, :2])
        ax.bar(range(n_cls), hist[:, j], color="C0")
        ax.set_title(f"feature {j}: A_j={a[j]:.1f}%", fontsize=8)
        ax.set_ylabel("% of class highly activated", fontsize=6)
        ax.set_xticks(range(n_cls), [c[:6] for c in classes] if n_cls <= 20 else [], fontsize=5, rotation=90)
        for t, r in enumerate(top):
            ax = fig.add_subplot(grid[f_i, 2 + t])
            overlay(ax, to_rgb(ctx, xj[t]), hj[t], f"{classes[label[r]][:10]} h={hn[r, j]:.3f}")
        num["features"][str(j)] = {"A_j": float(a[j]), "class_share_percent": [float(v) for v in hist[:, j]],
                                   "top_indices": [int(p["index"][r]) for r in top],
                                   "top_labels": [classes[label[r]] for r in top]}
    files.append(save(plt, fig, ctx, "gradcam_features.png"))
    return num, files


def read_masks(ctx, folder):
    """{prediction row: (core (s, s) bool or None, spurious or None)} for the images that have masks."""
    kinds = {}
    with open(os.path.join(folder, "features.csv")) as fh:
        for row in csv.DictReader(fh):
            if row.get("kind") not in ("core", "spurious"):
                raise common.UserError(f"{folder}/features.csv: every row needs class, feature and kind core|spurious.")
            kinds[(row["class"], str(row["feature"]))] = row["kind"]
    ds, p, size = ctx["dataset"], ctx["p"], ctx["size"]
    names = {}  # image name -> prediction row
    for r, i in enumerate(p["index"]):
        names[os.path.splitext(os.path.basename(ds.samples[i][0]))[0] if hasattr(ds, "samples") else str(i)] = r
    # an original-size mask goes through the image's resize and crop (common.eval_transform), nearest-neighbour
    geometry = [] if size == ctx["native"] and size <= 64 else [
        T.Resize(int(round(size * 256 / 224)) if size > 64 else size, interpolation=T.InterpolationMode.NEAREST),
        T.CenterCrop(size)]
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
                    raise common.UserError(f"mask '{d}/{fname}' is {m.size[0]}x{m.size[1]} px, but its image is "
                                           f"{orig[0]}x{orig[1]} and the model sees {size}x{size}.")
                m = T.Compose(geometry)(m)
            m = np.asarray(m, np.float32) / 255 > 0.5
            core, sp = found.get(r, (None, None))
            if kind == "core":
                core = m if core is None else core | m
            else:
                sp = m if sp is None else sp | m
            found[r] = (core, sp)
    if not found:
        raise common.UserError(f"no mask in '{folder}' names an image of {len(p['index'])} evaluated images "
                               f"(names are file stems for ImageFolder, split indices otherwise).")
    return found


def section_miou(ctx, args):
    if not args.masks:
        return {"skipped": "no --masks folder given"}, []
    found = read_masks(ctx, args.masks)
    rows = np.array(sorted(found))[: args.max_images]
    heat = heatmaps_of_l(ctx, rows)
    correct = ctx["p"]["correct"].astype(bool)[rows]
    iou = {k: np.full(len(rows), np.nan) for k in ("core", "spurious")}
    for i, r in enumerate(rows):
        for k, m in zip(("core", "spurious"), found[r]):
            if m is not None:
                iou[k][i] = soft_iou(heat[i], m)
    num = {"n_images": int(len(rows)), "soft_iou": "heatmap mass inside the mask (Sec. 5, s = sum of heatmap values)"}
    for k in iou:
        for name, sel in (("correct", correct), ("misclassified", ~correct)):
            v = iou[k][sel]
            num[f"miou_{k}_{name}"] = float(np.nanmean(v)) if np.isfinite(v).any() else None
    plt, fig = plt_figure(figsize=(12, 4))
    ax = fig.add_subplot(1, 4, 1)
    labels = ["core\ncorrect", "core\nwrong", "spurious\ncorrect", "spurious\nwrong"]
    vals = [num[f"miou_{k}_{n}"] for k in ("core", "spurious") for n in ("correct", "misclassified")]
    ax.bar(labels, [100 * (v or 0) for v in vals], color=["C0", "C1", "C0", "C1"])
    ax.set(title="mIoU (%)")
    ax.tick_params(labelsize=7)
    x = load_images(ctx, rows[:3])
    for i in range(len(x)):
        ax = fig.add_subplot(3, 4, 4 * i + 2)
        overlay(ax, to_rgb(ctx, x[i]), heat[i], f"IoU core {iou['core'][i]:.2f} sp {iou['spurious'][i]:.2f}")
        for t, k in enumerate(("core", "spurious")):
            ax = fig.add_subplot(3, 4, 4 * i + 3 + t)
            m = found[rows[i]][t]
            ax.imshow(np.zeros((ctx["size"],) * 2) if m is None else m, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{k} mask", fontsize=7)
            ax.axis("off")
    return num, [save(plt, fig, ctx, "miou.png")]


def section_adai(ctx, args, batch=64):
    p, head, dev = ctx["p"], ctx["head"].to(ctx["device"]), ctx["device"]
    mean, std = ctx["head_mean"].to(dev), ctx["head_std"].to(dev)
    rows = sample_rows(ctx, args.max_images)
    ys, os_, shown = [], [], None
    for s in range(0, len(rows), batch):
        r = rows[s:s + batch]
        x = load_images(ctx, r)
        labels = torch.as_tensor(p["label"][r], device=dev)
        y, o, cam, explained = explanation_scores(ctx["backbone"], head, mean, std, x, labels, ctx["stats"])
        ys.append(y.cpu().numpy())
        os_.append(o.cpu().numpy())
        if shown is None:  # the first images, for the figure
            shown = (x[:6], cam[:6], explained[:6], y[:6], o[:6], r[:6])
    y, o = np.concatenate(ys), np.concatenate(os_)
    ad, ai = average_drop_increase(y, o)
    correct = p["correct"].astype(bool)[rows]
    num = {"n_images": int(len(rows)), "average_drop": ad, "average_increase": ai,
           "score": "softmax probability of the true class; explanation = image x normalized CAM (Eq. 8)"}
    for name, sel in (("correct", correct), ("misclassified", ~correct)):
        if sel.any():
            num[f"average_drop_{name}"], num[f"average_increase_{name}"] = average_drop_increase(y[sel], o[sel])
    x, cam, explained, y6, o6, r6 = shown
    plt, fig = plt_figure(figsize=(2 * len(x), 6.3))
    for i in range(len(x)):
        ax = fig.add_subplot(3, len(x), i + 1)
        ax.imshow(to_rgb(ctx, x[i]))
        ax.set_title(f"{ctx['classes'][p['label'][r6[i]]][:10]} Y={y6[i]:.2f}", fontsize=7)
        ax.axis("off")
        overlay(fig.add_subplot(3, len(x), len(x) + i + 1), to_rgb(ctx, x[i]), cam[i].cpu().numpy(), "class CAM")
        ax = fig.add_subplot(3, len(x), 2 * len(x) + i + 1)
        ax.imshow(to_rgb(ctx, explained[i]))
        ax.set_title(f"explanation O={o6[i]:.2f}", fontsize=7)
        ax.axis("off")
    return num, [save(plt, fig, ctx, "adai.png")]


# --- report ---------------------------------------------------------------------------
def scalars(d, prefix="", deep=True):
    """The flat numbers of a section: all of them for the HTML tables; without the per-class
    and per-feature details (deep=False) for the printed table."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            if deep or k not in ("classes", "features"):
                out += scalars(v, f"{prefix}{k}.", deep)
        elif isinstance(v, (int, float, str)) or v is None:
            out.append((prefix + k, v))
        elif k == "accuracy":  # the subset table of the discriminative section
            out += [(f"top1@{r['k']} disc/random/pca", " / ".join(fmt(r[key]) for key in ("discriminative", "random", "pca")))
                    for r in v]
    return out


def fmt(v):
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def write_html(out, report):
    parts = ["<!doctype html><meta charset='utf-8'><title>interpret</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}td{padding:2px 10px}"
             "img{max-width:100%;border:1px solid #ccc}</style>", "<h1>What the backbone learned</h1>"]
    run = report.get("run", {})
    parts.append("<table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(fmt(v))}</td></tr>"
                                     for k, v in scalars(run)) + "</table>")
    for name in SECTIONS:
        if name not in report:
            continue
        sec = report[name]
        parts.append(f"<h2>{name}</h2><table>" + "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(fmt(v))}</td></tr>" for k, v in scalars(sec)
            if k != "figures") + "</table>")
        for f in sec.get("figures", []):
            if os.path.isfile(os.path.join(out, f)):  # only files that exist
                parts.append(f"<p><img src='{html.escape(f)}' alt='{html.escape(f)}'></p>")
    with open(os.path.join(out, "index.html"), "w") as fh:
        fh.write("\n".join(parts))


def main(args):
    ctx = load_inputs(args)
    out = ctx["out"]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "interpret.json")
    report = {}
    if os.path.isfile(path):  # a section run alone keeps the others' results
        with open(path) as fh:
            report = json.load(fh)
    lin = ctx["linear"]
    report["run"] = {"run_dir": args.run_dir, "dataset": args.dataset, "image_size": ctx["size"], "eps": args.eps,
                     **{k: lin[k] for k in ("offline_linear_top1", "offline_linear_top5", "knn_top1_k20", "knn_top1_k200")
                        if k in lin}}
    runners = {"qscore": section_qscore, "features": section_features, "discriminative": section_discriminative,
               "gradcam": lambda c: section_gradcam(c, args), "miou": lambda c: section_miou(c, args),
               "adai": lambda c: section_adai(c, args)}
    for name in SECTIONS:
        if name not in ctx["only"]:
            continue
        t0 = time.time()
        num, files = runners[name](ctx)
        report[name] = {**num, "seconds": time.time() - t0, "figures": files}
        print(f"== {name}", flush=True)
        for k, v in scalars(report[name], deep=False):
            print(f"  {k:<40s} {fmt(v)}", flush=True)
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)
    write_html(out, report)
    print(f"-> {os.path.join(out, 'index.html')}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main(parse_args()))
    except common.UserError as e:
        common.fail(str(e))
