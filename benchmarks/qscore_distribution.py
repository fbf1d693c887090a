"""Where do Q-Scores lie, and does a fixed threshold alpha mean the same on every backbone?

Eq. 4 of Kalibhat et al. regularizes the samples with Q_i < alpha, "the low-score samples".
With h L2-normalized, Q's scale depends on the width D of h (a unit vector's entries shrink as
1/sqrt(D)) and on training, so this measures Q on ~1000 CIFAR-10 images for a random ResNet-18
(D = 512), a random ResNet-50 (D = 2048) and any trained backbone.pt given with --trained:
mean and percentiles of Q, the share of empty L_i, the share under fixed alphas, and the
threshold a per-batch quantile picks (what --qscore-alpha-quantile does in the scripts).

Backbones run in train mode (BatchNorm batch statistics, as the regularizer sees them during
training) on batches of --batch-size eval-transformed images, without gradient, and again in
eval mode. Images: a fixed seed-0 random subset of the training split.

    python benchmarks/qscore_distribution.py --data-dir ../shared/data/cifar10 \\
        --trained runs/simclr_digits_s0_1700000000/backbone.pt
"""

import argparse
import copy
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import simclr  # noqa: E402  (its qscore is the one every method script carries)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data-dir", default="../shared/data/cifar10", help="ImageFolder root with train/"
    )
    p.add_argument("--images", type=int, default=1024, help="how many training images")
    p.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="batch of the train-mode pass (the scripts' default)",
    )
    p.add_argument(
        "--trained",
        action="append",
        default=[],
        help="a resnet18 backbone.pt (3x3 stem); repeatable",
    )
    p.add_argument(
        "--quantile", type=float, default=0.25, help="the per-batch quantile rule to check"
    )
    p.add_argument("--out", default="", help="write the numbers as JSON here too")
    return p.parse_args(argv)


@torch.no_grad()
def pooled(backbone, x, batch, train):
    net = copy.deepcopy(backbone).train(train)  # a copy: train mode updates BN running statistics
    return torch.cat([net(x[s : s + batch])[1] for s in range(0, len(x), batch)])


def describe(h, batch, quantile, alphas=(0.05, 0.1, 0.2)):
    q, mask = simclr.qscore(h)
    q = q.numpy()
    per_batch = [np.quantile(q[s : s + batch], quantile) for s in range(0, len(q), batch)]
    under_rule = np.mean(
        [(q[s : s + batch] < a).mean() for s, a in zip(range(0, len(q), batch), per_batch)]
    )
    row = {"D": h.shape[1], "mean": float(q.mean())}
    row.update({f"p{k}": float(np.percentile(q, k)) for k in (5, 25, 50, 75, 95)})
    row.update(
        {
            "empty_L": float((mask.sum(1) == 0).float().mean()),
            "mean_L": float(mask.sum(1).float().mean()),
        }
    )
    row.update({f"under_{a}": float((q < a).mean()) for a in alphas})
    row.update(
        {
            "rule_alpha_min": float(min(per_batch)),
            "rule_alpha_max": float(max(per_batch)),
            "under_rule": float(under_rule),
        }
    )
    return row


def main(args):
    torch.manual_seed(0)
    ds = common.make_dataset("folder", args.data_dir, train=True)
    keep = np.random.RandomState(0).permutation(len(ds))[: args.images]
    tf = common.eval_transform(32, common.STATS["cifar10"], 32)
    x = torch.stack([tf(ds[int(i)][0].convert("RGB")) for i in keep])
    nets = {
        "random resnet18": common.build_backbone("resnet18", small_images=True),
        "random resnet50": common.build_backbone("resnet50", small_images=True),
    }
    for path in args.trained:
        nets[f"trained resnet18 ({path})"] = common.build_backbone(
            "resnet18", small_images=True, weights=path
        )
    rows = {}
    for name, net in nets.items():
        for train in (True, False):
            key = f"{name}, {'train' if train else 'eval'} mode"
            rows[key] = describe(
                pooled(net, x, args.batch_size, train), args.batch_size, args.quantile
            )
            print(key, json.dumps({k: round(v, 4) for k, v in rows[key].items()}), flush=True)
    cols = [
        "D",
        "mean",
        "p5",
        "p25",
        "p50",
        "p75",
        "p95",
        "empty_L",
        "mean_L",
        "under_0.05",
        "under_0.1",
        "under_0.2",
        "rule_alpha_min",
        "rule_alpha_max",
        "under_rule",
    ]
    print("\n| backbone | " + " | ".join(cols) + " |\n|" + " --- |" * (len(cols) + 1))
    for key, r in rows.items():
        print(f"| {key} | " + " | ".join(f"{r[c]:.4g}" for c in cols) + " |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(
                {
                    "images": args.images,
                    "batch_size": args.batch_size,
                    "quantile": args.quantile,
                    "rows": rows,
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main(parse_args())
