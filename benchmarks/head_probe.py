"""Is a DINO or SwAV run stuck at the degenerate point where every output is uniform?

Both methods score a unit-norm embedding z against K unit-norm directions (DINO's weight-
normalized last layer, SwAV's prototypes): s_k = z . v_k. A loss at ln K means every image's
scores are nearly equal over k. With K > d the directions span the space, so equal scores need
a direction that the K vectors have (almost) left out, and z lying along it. This reads a
checkpoint, embeds --images test images in train mode (as training sees them), and reports:

  smallest_singular_values  of the (K, d) matrix of unit directions: one near 0 is the left-out one
  abs_cos_z_null            mean |cos(z, v_min)|, v_min the right singular vector of the
                            smallest one (random z: about 1/sqrt(d); 1: every z lies in the null
                            direction)
  score_std_over_k          per image, the std of s over the K directions, averaged over images
  score_std_over_images     per direction, the std of s over the images, averaged over directions
  mean_pairwise_cos_z       how alike the images' embeddings are (1: all one point)
  target_entropy (DINO)     entropy of the teacher's centered, sharpened target, against ln K

For DINO the student and the teacher are both reported. A run's checkpoint.pt, or any file of
the same form (the scripts' checkpoints). Nothing here trains.

    python benchmarks/head_probe.py \\
        benchmarks/results/learning_64k/runs/dino_cleanssl/checkpoint.pt \\
        --data-dir ../shared/data/cifar10 --out probe.json
"""

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="a dino.py or swav.py checkpoint.pt")
    p.add_argument(
        "--data-dir", default="", help="data of the run (default: the checkpoint's --data-dir)"
    )
    p.add_argument(
        "--images", type=int, default=256, help="test images, evenly spaced over the split"
    )
    p.add_argument(
        "--batch-size", type=int, default=128, help="train-mode batch (BatchNorm batch statistics)"
    )
    p.add_argument(
        "--init",
        action="store_true",
        help="probe a fresh model built from the checkpoint's flags after "
        "torch.manual_seed(its --seed), as the run's start (the same distribution; the run's own "
        "start may differ, as its data set-up can draw random numbers first); the teacher is its "
        "copy, the center 0",
    )
    p.add_argument("--out", default="", help="write the numbers as JSON here too")
    return p.parse_args(argv)


def head_stats(z, directions):
    """z: (N, d) unit-norm embeddings; directions: (K, d) unit-norm rows. The numbers above."""
    s = z @ directions.T  # (N, K) cosines
    _, sv, vh = torch.linalg.svd(directions, full_matrices=False)  # sv descending, vh (d, d)
    n = len(z)
    gram = z @ z.T
    return {
        "smallest_singular_values": [round(v, 4) for v in sv[-3:].tolist()],
        "largest_singular_value": round(sv[0].item(), 4),
        "abs_cos_z_null": (z @ vh[-1]).abs().mean().item(),
        "abs_cos_random_direction": 1 / math.sqrt(z.shape[1]),
        "score_std_over_k": s.std(1).mean().item(),
        "score_std_over_images": s.std(0).mean().item(),
        "mean_pairwise_cos_z": ((gram.sum() - gram.diagonal().sum()) / (n * (n - 1))).item(),
    }


def test_images(args, ckpt_args):
    name = ckpt_args["dataset"]
    ds = common.make_dataset(
        name, args.data_dir or ckpt_args["data_dir"], train=False, download=False
    )
    native = common.IMAGE_SIZE[name]
    size = ckpt_args["image_size"] or native
    tf = common.eval_transform(size, common.STATS[name], native)
    idx = torch.linspace(0, len(ds) - 1, min(args.images, len(ds))).long().tolist()
    return torch.stack([tf(common.load_image(ds, i)[0]) for i in idx]), size


@torch.no_grad()
def probe(args):
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    method = ckpt.get("method")
    if method not in ("dino", "swav"):
        common.fail(
            f"'{args.checkpoint}' is a checkpoint of {method!r}; head_probe.py reads dino.py and "
            "swav.py ones."
        )
    a = argparse.Namespace(**ckpt["args"])
    x, size = test_images(args, ckpt["args"])
    mod = __import__(method)
    if args.init:
        torch.manual_seed(a.seed)
    model = (mod.DINO if method == "dino" else mod.SwAV)(a, size <= 64)
    if not args.init:
        model.load_state_dict(ckpt["model"])
    nets = {"student": model}
    if method == "dino":
        teacher = mod.Teacher(model)
        if not args.init:
            teacher.load_state_dict(ckpt["teacher"])
        nets["teacher"] = teacher
    center = torch.zeros(1, a.prototypes) if args.init else ckpt.get("center")
    out = {
        "checkpoint": args.checkpoint,
        "method": method,
        "epoch": 0 if args.init else ckpt["epoch"],
        "images": len(x),
        "prototypes": a.prototypes,
        "ln_K": math.log(a.prototypes),
    }
    for name, net in nets.items():
        net.train()  # train-mode BatchNorm, as the loss sees the batch
        head = net.head if method == "dino" else net
        zs = []
        for xb in x.split(args.batch_size):
            h = net.backbone(xb)[1]
            zs.append(net.head(h)[0] if method == "dino" else F.normalize(net.projector(h), dim=1))
        w = head.last_layer.weight if method == "dino" else net.prototypes.weight
        out[name] = head_stats(torch.cat(zs).float(), F.normalize(w.float(), dim=1))
    if (
        method == "dino"
    ):  # the teacher's target P_t = softmax((g_t - c) / tau_t) at the run's final tau_t
        t = torch.cat([nets["teacher"]([xb]) for xb in x.split(args.batch_size)])  # (N, K)
        p = F.softmax((t - center) / a.teacher_temp, dim=1)
        out["target_entropy"] = -(p * p.clamp_min(1e-12).log()).sum(1).mean().item()
    return out


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        common.fail(f"no checkpoint at '{args.checkpoint}'.")
    try:
        out = probe(args)
    except common.UserError as e:
        common.fail(str(e))
    print(json.dumps(out, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as fh:
            json.dump(out, fh, indent=1)
        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
