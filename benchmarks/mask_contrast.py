"""How much does the correlation mask mu tell related from unrelated positives, in each form?

The cross-attention add-on's target mu (Seyfi et al., Eq. 3 and 4) compares an image's feature map
with a positive's: Eq. 3 takes the inner product of channel vectors over D, the best match over the
positive's positions, and the scripts divide by one scale, the batch's largest mu
(`--xattn-mask eq3`); `--xattn-mask cosine` takes the cosine of the channel vectors instead. A
target that the attention head can learn from should be high where a positive of the same kind
shares parts with the image, low for an unrelated positive, and vary over positions. This reads a
run's backbone (or a random one), takes --images test images (a fixed seed-0 subset), and pairs
each with a related positive (another test image of its class: the label stands in for the
k-means cluster) and an unrelated one (an image of another class), all in one batch per form, so
that Eq. 3's batch scale is shared by both kinds. For each form it reports:

  mean_related, mean_unrelated  mu averaged over positions and images, for each kind of positive
  ratio                         mean_related / mean_unrelated (1: the mask cannot tell them apart)
  auroc                         how often an image's mean mu against its related positive is above
                                its mean mu against the unrelated one, over all pairs of images
                                (0.5: no signal)
  spatial_cv                    per image and related positive, std over positions / mean, averaged
                                (0: a flat mask, no "where")
  faint_position                mu at one position whose channel vector is scaled by 1e-3, over
                                the image's mean mu elsewhere (Eq. 3 mutes it; the cosine not)

    python benchmarks/mask_contrast.py RUN_DIR --out contrast.json
    python benchmarks/mask_contrast.py --random resnet18-quarter --data-dir ../shared/data/cifar10

The functions are simclr.py's (the add-ons block is one text in every script). Nothing trains.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import simclr  # noqa: E402  (the add-ons block: correlation_mask)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run", nargs="?", default="", help="a run folder (args.json, backbone.pt)")
    p.add_argument("--random", default="", help="instead of a run: this backbone, seed-0 init")
    p.add_argument("--dataset", default="folder", help="with --random: the data set")
    p.add_argument("--data-dir", default="", help="the data (default: the run's --data-dir)")
    p.add_argument("--image-size", type=int, default=32, help="with --random: the image side")
    p.add_argument("--images", type=int, default=1000, help="test images (anchors)")
    p.add_argument("--batch-size", type=int, default=100, help="anchors per batch (Eq. 3 scale)")
    p.add_argument("--out", default="", help="JSON file for the numbers")
    return p.parse_args(argv)


def auroc(pos, neg):
    """P(a related score > an unrelated one), ties counting half: the Mann-Whitney statistic."""
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


@torch.no_grad()
def feature_maps(backbone, dataset, rows, size, stats, native):
    """f (N, D, h, w): the backbone's last feature maps of dataset[rows], eval mode."""
    tf = common.eval_transform(size, stats, native)
    x = torch.stack([tf(common.load_image(dataset, i)[0]) for i in rows])
    return torch.cat([backbone(b)[0] for b in x.split(256)])


def measure(f, labels, batch, seed=0):
    """The numbers above for both forms; f (N, D, h, w), labels (N,)."""
    g = np.random.RandomState(seed)
    n = len(labels)
    related = np.array(
        [g.choice(np.flatnonzero((labels == labels[i]) & (np.arange(n) != i))) for i in range(n)]
    )
    unrelated = np.array([g.choice(np.flatnonzero(labels != labels[i])) for i in range(n)])
    out = {}
    for form in ("eq3", "cosine"):
        rel, unr, cv, faint = [], [], [], []
        for s in range(0, n, batch):
            i = np.arange(s, min(n, s + batch))
            fs = torch.cat([f[i], f[i]])  # each anchor twice: with its related, its unrelated one
            fp = torch.cat([f[related[i]], f[unrelated[i]]])[:, None]  # (2b, 1, D, h, w)
            mu = simclr.correlation_mask(fs, fp, form)  # one batch scale for both kinds
            b = len(i)
            rel.append(mu[:b].mean((1, 2)))
            unr.append(mu[b:].mean((1, 2)))
            cv.append(mu[:b].flatten(1).std(1) / mu[:b].flatten(1).mean(1).clamp_min(1e-12))
            weak = f[i].clone()
            weak[:, :, 0, 0] *= 1e-3  # one position of each anchor, faint
            mw = simclr.correlation_mask(weak, f[related[i]][:, None], form)
            rest = (mw.flatten(1).sum(1) - mw[:, 0, 0]) / (mw[0].numel() - 1)
            faint.append(mw[:, 0, 0] / rest.clamp_min(1e-12))
        rel, unr = torch.cat(rel).numpy(), torch.cat(unr).numpy()
        out[form] = {
            "mean_related": float(rel.mean()),
            "mean_unrelated": float(unr.mean()),
            "ratio": float(rel.mean() / max(unr.mean(), 1e-12)),
            "auroc": auroc(rel, unr),
            "spatial_cv": float(torch.cat(cv).mean()),
            "faint_position": float(torch.cat(faint).mean()),
        }
    return out


def main(a):
    if bool(a.run) == bool(a.random):
        common.fail("give a run folder or --random BACKBONE, one of the two.")
    if a.run:
        with open(os.path.join(a.run, "args.json")) as fh:
            saved = json.load(fh)
        name, dataset, size = saved["backbone"], saved["dataset"], saved["image_size"]
        data_dir = a.data_dir or saved["data_dir"]
    else:
        name, dataset, size, data_dir = a.random, a.dataset, a.image_size, a.data_dir
    native = common.IMAGE_SIZE[dataset]
    size = size or native
    torch.manual_seed(0)
    weights = os.path.join(a.run, "backbone.pt") if a.run else None
    backbone = common.build_backbone(name, size <= 64, weights=weights).eval()
    test = common.make_dataset(dataset, data_dir, train=False, download=False)
    keep = np.random.RandomState(0).permutation(len(test))[: a.images]
    labels = np.asarray(common.targets_of(test))[keep]
    t0 = time.time()
    f = feature_maps(backbone, test, keep.tolist(), size, common.STATS[dataset], native)
    result = {
        "backbone": a.run or f"random {name} (seed 0)",
        "images": len(keep),
        "feature_map": list(f.shape[1:]),
        **measure(f, labels, a.batch_size),
        "seconds": round(time.time() - t0, 1),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(result, indent=2))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main(parse_args())
