"""One-step parity of a method script against lightly's implementation: where do the two part?

The same initial weights and the same augmented batches go through a ladder of configurations.
Rung 0 is the script as it trains (its model, loss and LARS with the resolved flags). Each later
rung swaps one more piece for lightly's, in the order a reader would check them.

simclr (simclr.py against lightly's SimCLR):
  1 loss      lightly.loss.NTXentLoss instead of nt_xent_loss            (expected: identical)
  2 views     each view through the network on its own (lightly's examples); simclr.py does the same
              by default (--per-view-bn), so this rung changes something only with --no-per-view-bn
  3 optimizer lightly.utils.lars.LARS (unclipped, lr * eta ||w|| / (||g|| + wd ||w||)) instead of
              CleanSSL's LARS in the script's --lars-mode
  4 head      lightly's SimCLRProjectionHead (bias-free Linears, BatchNorm1d after each) instead of
              CleanSSL's projector (--projector; solo-learn's by default: Linear-ReLU-Linear with
              biases, no BN); the Linears' weights (and BNs', where both have them) are copied

swav (swav.py against lightly's SwAV; no queue: the learning study's budgets end before
--queue-start):
  1 loss      lightly.loss.SwaVLoss (its Sinkhorn and swapped prediction) instead of assign_codes
              and swav_loss on the same scores                            (expected: identical)
  2 views     each crop through the network on its own (lightly's examples and the learning study's
              lightly half); swav.py passes the crops of one size as one batch, so BatchNorm sees 2b
  3 optimizer lightly.utils.lars.LARS instead of CleanSSL's LARS in the script's --lars-mode
  4 head      lightly's SwaVProjectionHead and SwaVPrototypes: the weights are copied (the head's
              first Linear has no bias in lightly, which the BatchNorm after it cancels), but
              lightly's prototypes are a Linear with a bias, kept at its initialization, and are
              held by lightly's own step counter (n_steps_frozen_prototypes) instead of a dropped
              gradient
  Prototypes are held for --freeze-steps steps on every rung (default 0, so that they move).

byol (byol.py against lightly's BYOL; the target's tau follows a schedule of
--schedule-steps steps):
  1 loss      lightly.loss.NegativeCosineSimilarity as 4 + 4 x 0.5 (ncs(p1, z2) + ncs(p2, z1)),
              which is BYOL's summed 2 - 2 cos                            (expected: identical)
  2 scale     lightly's 0.5 (ncs(p1, z2) + ncs(p2, z1)) as it is: a quarter of BYOL's gradient, so
              weight decay weighs 4x more against it in the trust ratio and the biases and norms
              (plain SGD, no LARS) take 4x smaller steps
  3 optimizer lightly.utils.lars.LARS instead of CleanSSL's LARS in the script's --lars-mode
  4 head      lightly's BYOLProjectionHead and BYOLPredictionHead (byol.py's layers, weights copied;
              expected: identical), and lightly's target update: update_momentum with
              cosine_schedule before the forward (byol.py: ema_update with tau_at after the step)

After each rung the script reports, for step 1, the loss and the largest relative difference of
the gradients and of the updated weights to the previous rung, and for `--steps` steps the loss
trajectory and the relative distance of the weights to rung 0's. At step 1 it also prints the
per-layer step size each optimizer takes (lr times its trust ratio), the quantity in which the two
LARS forms differ. Run with lightly's interpreter (see benchmarks/learning.py):

    ../lightly-venv/bin/python benchmarks/parity.py --steps 10 --batch-size 64 \\
        --out benchmarks/results/learning/parity_simclr.json
    ../lightly-venv/bin/python benchmarks/parity.py swav --steps 10 --batch-size 64 \\
        --extra "--lars-mode official" --out benchmarks/results/learning/parity_swav.json
    ../lightly-venv/bin/python benchmarks/parity.py byol --steps 10 --batch-size 64 \\
        --extra "--lars-mode official" --out benchmarks/results/learning/parity_byol.json

Data: the shared CIFAR-10 copy (../shared/data/cifar10), or --dataset digits; the batches come from
common.TrainLoader with the script's own views (so both sides see the same augmented pixels;
lightly's transforms are not part of the parity).
"""

import argparse
import copy
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import byol  # noqa: E402
import common  # noqa: E402
import simclr  # noqa: E402
import swav  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "method", nargs="?", default="simclr", choices=list(METHODS), help="the script to compare"
    )
    p.add_argument("--steps", type=int, default=10, help="steps of every rung")
    p.add_argument(
        "--freeze-steps",
        type=int,
        default=0,
        help="swav: prototypes held for the first N steps of every rung",
    )
    p.add_argument(
        "--schedule-steps",
        type=int,
        default=1000,
        help="byol: length of the target's tau schedule (default: the learning study's 64k-image "
        "budget at batch 64)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--dataset", default="folder", choices=["folder", "digits"], help="digits: plumbing only"
    )
    p.add_argument(
        "--data-dir",
        default=os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10"),
        help="ImageFolder root with train/ (--dataset folder)",
    )
    p.add_argument("--extra", default="", help="the script's flags, e.g. '--lars-mode official'")
    p.add_argument("--out", default="", help="JSON of the result")
    return p.parse_args(argv)


def lightly_groups(modules, wd):
    from lightly.models.utils import get_weight_decay_parameters

    dec, no = get_weight_decay_parameters(modules)
    return [{"params": dec, "weight_decay": wd}, {"params": no, "weight_decay": 0.0}]


def build_simclr(rung, init, a, b):
    """The model, a loss function of (model, crops, step) and the optimizer of a rung."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.utils.lars import LARS as LightlyLARS

    model = copy.deepcopy(init)
    if rung >= 4:  # lightly's head, with CleanSSL's weights where the layers agree
        head = SimCLRProjectionHead(model.backbone.dim, a.proj_hidden, a.proj_dim)
        for kind in (torch.nn.Linear, torch.nn.BatchNorm1d):  # in order, layer kind by kind
            ours = [m for m in model.projector if isinstance(m, kind)]
            theirs = [m for m in head.layers if isinstance(m, kind)]
            for o, t in zip(ours, theirs):  # a BN that --projector solo-learn lacks stays new
                t.weight.data.copy_(o.weight.data)
                if o.bias is not None and t.bias is not None:  # lightly's Linears have none
                    t.bias.data.copy_(o.bias.data)
        model.projector = head
    ntxent = NTXentLoss(temperature=a.temperature)

    def loss(m, crops, step):
        x1, x2 = crops
        if rung >= 2:  # one view at a time: BatchNorm statistics per view
            z1, z2 = (m.projector(m.backbone(x)[1]) for x in (x1, x2))
        else:
            z = m([x1, x2])["z"]
            z1, z2 = z[: len(x1)], z[len(x1) :]
        return ntxent(z1, z2) if rung >= 1 else simclr.nt_xent_loss(z1, z2, a.temperature)

    if rung >= 3:
        opt = LightlyLARS(
            lightly_groups([model], a.weight_decay),
            lr=0.0,
            momentum=0.9,
            trust_coefficient=a.lars_eta,
        )
    else:
        opt = common.LARS(
            common.param_groups(model),
            lr=0.0,
            weight_decay=a.weight_decay,
            eta=a.lars_eta,
            mode=a.lars_mode,
        )
    return model, loss, opt, lambda m, step: None, lambda m, step: None


def build_swav(rung, init, a, b):
    """As build_simclr, for swav.py: rung 0 is its training step (prototypes normalized, then
    scores, assign_codes, swav_loss, and the prototypes' gradient dropped while they are held)."""
    from lightly.loss import SwaVLoss
    from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
    from lightly.utils.lars import LARS as LightlyLARS

    model = copy.deepcopy(init)
    if rung >= 4:  # lightly's head and prototypes, with CleanSSL's weights
        head = SwaVProjectionHead(model.backbone.dim, a.proj_hidden, a.proj_dim)
        ours = [
            m for m in model.projector if isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d))
        ]
        theirs = [m for m in head.layers if isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d))]
        for o, t in zip(ours, theirs):  # Linear (no bias in lightly), BN, Linear with bias
            t.weight.data.copy_(o.weight.data)
            if t.bias is not None:
                t.bias.data.copy_(o.bias.data)
        protos = SwaVPrototypes(a.proj_dim, a.prototypes, n_steps_frozen_prototypes=b.freeze_steps)
        protos.heads[0].weight.data.copy_(model.prototypes.weight.data)  # its bias stays lightly's
        model.projector, model.prototypes = head, protos
    criterion = SwaVLoss(
        temperature=a.temperature,
        sinkhorn_iterations=a.sinkhorn_iters,
        sinkhorn_epsilon=a.sinkhorn_epsilon,
    )

    def loss(m, crops, step):
        if rung >= 4:
            m.prototypes.normalize()
        else:
            with torch.no_grad():
                m.prototypes.weight.copy_(torch.nn.functional.normalize(m.prototypes.weight, dim=1))
        if rung >= 2:  # one crop at a time: BatchNorm statistics per crop
            z = [torch.nn.functional.normalize(m.projector(m.backbone(x)[1]), dim=1) for x in crops]
            scores = [m.prototypes(zi, step) if rung >= 4 else m.prototypes(zi) for zi in z]
        else:
            scores = list(m(crops)["scores"].unflatten(0, (len(crops), len(crops[0]))))
        if rung >= 1:
            return criterion(scores[:2], scores[2:])
        s = torch.stack(scores)  # (V, b, K)
        codes = swav.assign_codes(
            s.detach(), None, m.prototypes.weight.detach(), a.sinkhorn_epsilon, a.sinkhorn_iters
        )
        return swav.swav_loss(s, codes, a.temperature)

    def hold(m, step):  # swav.py drops the held prototypes' gradient; lightly's never computes it
        if rung < 4 and step < b.freeze_steps:
            m.prototypes.weight.grad = None

    if rung >= 3:
        opt = LightlyLARS(
            lightly_groups([model], a.weight_decay),
            lr=0.0,
            momentum=0.9,
            trust_coefficient=a.lars_eta,
        )
    else:
        opt = common.LARS(
            common.param_groups(model, a.exclude_bias_norm),
            lr=0.0,
            weight_decay=a.weight_decay,
            eta=a.lars_eta,
            mode=a.lars_mode,
        )
    return model, loss, opt, hold, lambda m, step: None


def build_byol(rung, init, a, b):
    """As build_simclr, for byol.py: rung 0 is its training step (forward, regression_loss, LARS,
    then ema_update of the target with tau_at). The fifth value is the after-step hook."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.utils.lars import LARS as LightlyLARS
    from lightly.utils.scheduler import cosine_schedule

    model = copy.deepcopy(init)
    # lightly's heads with byol.py's weights (the same layers), and targets as lightly copies them
    if rung >= 4:
        heads = (
            BYOLProjectionHead(model.backbone.dim, a.proj_hidden, a.proj_dim),
            BYOLPredictionHead(a.proj_dim, a.pred_hidden, a.proj_dim),
        )
        for ours, head in zip((model.projector, model.predictor), heads):
            head.layers.load_state_dict(ours.state_dict())
        model.projector, model.predictor = heads
        model.target_backbone = copy.deepcopy(model.backbone).requires_grad_(False)
        model.target_projector = copy.deepcopy(model.projector).requires_grad_(False)
    ncs = NegativeCosineSimilarity()
    total = b.schedule_steps

    def loss(m, crops, step):
        if rung >= 4:  # lightly's order: the target follows the online network before the forward
            tau = cosine_schedule(step, total, a.tau_base, a.tau_final)
            update_momentum(m.backbone, m.target_backbone, tau)
            update_momentum(m.projector, m.target_projector, tau)
            p = [m.predictor(m.projector(m.backbone(x)[1])) for x in crops]
            with torch.no_grad():
                z = [m.target_projector(m.target_backbone(x)[1]) for x in crops]
        else:
            out = m(crops)
            bs = len(crops[0])
            p, z = (out["p"][:bs], out["p"][bs:]), (out["z_target"][:bs], out["z_target"][bs:])
        if rung == 0:
            return byol.regression_loss(p[0], p[1], z[0], z[1])
        lightly_loss = 0.5 * (ncs(p[0], z[1]) + ncs(p[1], z[0]))
        return 4 + 4 * lightly_loss if rung == 1 else lightly_loss

    def after(m, step):
        if rung < 4:
            tau = byol.tau_at(step, total, a.tau_base, a.tau_final)
            byol.ema_update(m.target_backbone, m.backbone, tau)
            byol.ema_update(m.target_projector, m.projector, tau)

    online = [model.backbone, model.projector, model.predictor]
    if rung >= 3:
        opt = LightlyLARS(
            lightly_groups(online, a.weight_decay),
            lr=0.0,
            momentum=0.9,
            trust_coefficient=a.lars_eta,
        )
    else:
        opt = common.LARS(
            common.param_groups(model),
            lr=0.0,
            weight_decay=a.weight_decay,
            eta=a.lars_eta,
            mode=a.lars_mode,
        )
    return model, loss, opt, lambda m, step: None, after


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def step_sizes(model, opt, lr):
    """Per weight tensor: the factor its gradient is multiplied by in this step (lr x trust)."""
    out = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            if p.grad is None or p.ndim <= 1:
                continue
            w, gr, wd = p.norm().item(), p.grad.norm().item(), g["weight_decay"]
            ratio = w / (gr + wd * w)
            if "mode" in g:  # CleanSSL's LARS
                f = (
                    min(g["eta"] * ratio, lr)
                    if g["mode"] == "clip"
                    else lr * g["eta"] * w / (p.grad + wd * p).norm().item()
                )
            else:
                f = lr * g["trust_coefficient"] * ratio
            out[names[id(p)]] = f
    return out


# per method: the script, its model, its training views at 32 px, the ladder's builder and
# rung names
METHODS = {
    "simclr": (
        simclr,
        simclr.SimCLR,
        lambda a: common.simclr_views(32, a.crop_min_scale, a.jitter_strength, a.blur_prob),
        build_simclr,
        [
            "0 CleanSSL",
            "1 + lightly NTXentLoss",
            "2 + views one at a time",
            "3 + lightly LARS",
            "4 + lightly head",
        ],
    ),
    "swav": (
        swav,
        swav.SwAV,
        lambda a: swav.swav_views(32, a),
        build_swav,
        [
            "0 CleanSSL",
            "1 + lightly SwaVLoss",
            "2 + crops one at a time",
            "3 + lightly LARS",
            "4 + lightly head, prototypes",
        ],
    ),
    "byol": (
        byol,
        byol.BYOL,
        lambda a: byol.train_views(a, 32),
        build_byol,
        [
            "0 CleanSSL",
            "1 + lightly loss, x4",
            "2 + lightly's loss scale",
            "3 + lightly LARS",
            "4 + lightly heads, target update",
        ],
    ),
}


def main(b):
    torch.use_deterministic_algorithms(True)
    script, model_class, train_views, build, names = METHODS[b.method]
    a = script.parse_args(
        ["--image-size", "32", "--batch-size", str(b.batch_size)] + b.extra.split()
    )
    dataset, data_dir = b.dataset, b.data_dir if b.dataset == "folder" else ""
    common.check_dataset(dataset, data_dir)
    train = common.make_dataset(dataset, data_dir, train=True)
    stats = common.STATS[dataset]
    loader = common.TrainLoader(
        train, train_views(a), b.batch_size, stats, torch.device("cpu"), seed=0, workers=0
    )
    batches = []
    for crops, _, _ in loader:
        batches.append(crops)
        if len(batches) == b.steps:
            break
    torch.manual_seed(0)
    init = model_class(a, small_images=True)
    lr = a.lr * b.batch_size / 256  # the warm-up's end: parity is about the step, not the schedule
    rungs, prev = [], None
    ref_backbone = None
    for r, name in enumerate(names):
        model, loss_fn, opt, hold, after = build(r, init, a, b)
        model.train()
        params = [p for p in model.backbone.parameters()]
        losses, first = [], {}
        for s, crops in enumerate(batches):
            for g in opt.param_groups:
                g["lr"] = lr
            loss = loss_fn(model, crops, s)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            hold(model, s)
            if s == 0:
                first["grad"] = flat([p.grad for p in params]).clone()
                first["sizes"] = step_sizes(model, opt, lr)
            opt.step()
            after(model, s)
            if s == 0:
                first["weights"] = flat([p.detach() for p in params]).clone()
            losses.append(loss.item())
        w = flat([p.detach() for p in model.backbone.parameters()])
        ref_backbone = w if ref_backbone is None else ref_backbone
        row = {
            "rung": name,
            "loss_step1": losses[0],
            "losses": losses,
            "backbone_vs_rung0_after_all_steps": rel(w, ref_backbone),
        }
        if prev is not None:
            row["grad_vs_previous_step1"] = rel(first["grad"], prev["grad"])
            row["weights_vs_previous_step1"] = rel(first["weights"], prev["weights"])
        sizes = first["sizes"]
        row["step_size_median"] = float(torch.tensor(list(sizes.values())).median())
        row["step_size_min_max"] = [min(sizes.values()), max(sizes.values())]
        rungs.append(row)
        prev = first
        print(
            f"{name:26s} loss@1 {losses[0]:.6f}  loss@{len(losses)} {losses[-1]:.4f}  "
            f"grad@1 vs prev {row.get('grad_vs_previous_step1', 0):.2e}  "
            f"weights@1 vs prev {row.get('weights_vs_previous_step1', 0):.2e}  "
            f"backbone@{len(losses)} vs rung 0 {row['backbone_vs_rung0_after_all_steps']:.2e}  "
            f"lr x trust median {row['step_size_median']:.3g} [{row['step_size_min_max'][0]:.3g}, "
            f"{row['step_size_min_max'][1]:.3g}]",
            flush=True,
        )
    result = {
        "method": b.method,
        "dataset": dataset,
        "batch_size": b.batch_size,
        "steps": b.steps,
        "lr": lr,
        "flags": b.extra,
        "lars_mode": a.lars_mode,
        "lars_eta": a.lars_eta,
        "rungs": rungs,
        "torch": torch.__version__,
    }
    if b.out:
        with open(b.out + ".tmp", "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(b.out + ".tmp", b.out)
        print(f"wrote {b.out}")
    return 0


if __name__ == "__main__":
    args = parse_args()
    try:
        import lightly  # noqa: F401
    except ImportError:
        common.fail(
            "parity.py needs lightly, which this Python does not have: run it with "
            "../lightly-venv/bin/python (see benchmarks/learning.py)."
        )
    try:
        raise SystemExit(main(args))
    except common.UserError as e:
        common.fail(str(e))
