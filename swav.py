"""SwAV: crops are soft-assigned to K learnable prototypes, the batch spread equally over
them (Sinkhorn-Knopp, sums over all processes); each crop predicts the assignment ("code")
of the others. Multi-crop: 2 global crops give codes; they and N small crops predict them.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", NeurIPS 2020. Defaults: solo-learn's CIFAR recipe (2 crops of 32 px, no local
crops); the ImageNet command is the official one (facebookresearch/swav: 2x224 + 6x96, batch
4096 on 64 GPUs, 75.3% linear). RECIPES.md compares both, flag for flag.

    python swav.py --dataset digits --epochs 1                    # offline demo
    python swav.py --dataset cifar10 --data-dir data              # 1000 epochs, 1 GPU
    torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 swav.py \
        --dataset folder --data-dir /imagenet --backbone resnet50 --epochs 800 --batch-size 4096 \
        --lr 0.3 --weight-decay 1e-6 --lars-mode official --lars-eta 0.001 --no-exclude-bias-norm \
        --local-crops 6 --global-scale 0.14 1 --local-scale 0.05 0.14 --queue-size 0 \
        --freeze-prototypes-epochs 1
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "swav"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add, bool_flag = p.add_argument, argparse.BooleanOptionalAction  # sources: RECIPES.md
    add("--local-crops", type=int, default=0, help="small crops beside the 2 global ones")
    scale = dict(type=float, nargs=2, metavar=("MIN", "MAX"))
    add("--global-scale", **scale, default=(0.08, 1.0), help="area range of the global crops")
    add("--local-scale", **scale, default=(0.05, 0.14), help="area range of the local crops")
    add(
        "--blur-prob",
        type=float,
        nargs=3,
        default=(0.5, 0.5, 0.5),
        metavar=("G1", "G2", "L"),
        help="Gaussian blur probability of global crop 1, 2 and each local crop",
    )
    add("--epochs", type=int, default=1000, help="training epochs")
    add("--batch-size", type=int, default=256, help="global batch, split over processes")
    add("--lr", type=float, default=0.6, help="LARS learning rate per 256 images")
    add("--weight-decay", type=float, default=1e-6, help="weight decay")
    add(
        "--exclude-bias-norm",
        action=bool_flag,
        default=True,
        help="biases and norm weights get no weight decay and no LARS adaptation",
    )
    add(
        "--lars-mode",
        default="clip",
        choices=["clip", "official"],
        help="LARS form (common.LARS)",
    )
    add("--lars-eta", type=float, default=0.02, help="LARS trust coefficient")
    add("--warmup-epochs", type=float, default=10, help="linear warm-up, then cosine decay")
    add("--temperature", type=float, default=0.1, help="temperature tau of the predictions")
    add("--prototypes", type=int, default=3000, help="number of prototypes K")
    add("--sinkhorn-epsilon", type=float, default=0.05, help="entropy weight epsilon of the codes")
    add("--sinkhorn-iters", type=int, default=3, help="Sinkhorn-Knopp iterations")
    add("--queue-size", type=int, default=3840, help="global queue of past embeddings, 0: none")
    add("--queue-start", type=int, default=50, help="epoch at which the queue starts filling")
    add("--freeze-prototypes-epochs", type=float, default=2, help="prototypes fixed for N epochs")
    add("--proj-hidden", type=int, default=2048, help="projector hidden width")
    add("--proj-dim", type=int, default=128, help="projector output width")
    add(
        "--zero-init-residual",
        action=bool_flag,
        default=False,
        help="each residual branch's last BN starts at 0",
    )
    add("--sync-bn", action=bool_flag, default=True, help="BatchNorm over all processes, CUDA only")
    add_addon_flags(p)
    common.add_run_flags(p)
    return p.parse_args(argv)


# --- the method ---------------------------------------------------------------------
class SwAV(nn.Module):
    """Backbone -> h -> projector -> z (unit norm) -> scores z^T c_k against K prototypes
    (a bias-free linear layer whose rows main() keeps unit-norm). Downstream tasks use h."""

    def __init__(self, args, small_images):
        super().__init__()
        self.backbone = common.build_backbone(
            args.backbone, small_images, zero_init_residual=args.zero_init_residual
        )
        d = self.backbone.dim
        self.projector = nn.Sequential(  # SwAV's 2-layer MLP head with BN
            nn.Linear(d, args.proj_hidden),
            nn.BatchNorm1d(args.proj_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(args.proj_hidden, args.proj_dim),
        )
        self.prototypes = nn.Linear(args.proj_dim, args.prototypes, bias=False)
        self.xattn = (
            CrossAttentionHead(d, args.xattn_clusters, args.xattn_temp) if args.xattn else None
        )

    def forward(self, crops, positives=None):
        # As in the official code, one backbone pass per crop size; the positives have the global
        # size and ride along. h (V*b, D) in crop order; f (b + b*P, D, h, w): the first crop's
        # maps, then the positives'
        b = crops[0].shape[0]
        h, f = common.multicrop_pass(self.backbone, crops, positives)
        z = F.normalize(self.projector(h), dim=1)  # (V*b, d)
        # float32 scores: Sinkhorn's exp(s / 0.05) would amplify bf16 rounding
        with torch.autocast(h.device.type, enabled=False):
            scores = self.prototypes(z.float())  # (V*b, K)
        # Q-Score sees the 2 global crops only, not the local ones
        out = {"h": h[: 2 * b], "z": z, "scores": scores}
        if self.xattn is not None and positives is not None:
            out["f"] = f  # anchors (crop 1), then positives
            out["beta"], out["logits"] = self.xattn(out["f"])
        return out


def _all_reduce(x, op=dist.ReduceOp.SUM):
    if common.world_size() > 1:
        dist.all_reduce(x, op=op)
    return x


@torch.no_grad()
def sinkhorn(scores, epsilon=0.05, iterations=3):
    """Codes Q* = Diag(u) exp(C^T Z / epsilon) Diag(v) (Caron et al. 2020, Sec. 3.1): the
    soft assignment nearest the scores in the polytope {Q 1_B = 1_K / K, Q^T 1_K = 1_B / B},
    by `iterations` Sinkhorn-Knopp steps. scores: (n, K) on each process, n equal on all;
    every sum runs over all processes (B = n * world), as one process with all rows would.
    Returns (n, K): each row sums to 1 exactly, each column to about B / K."""
    s = scores.float()
    shift = _all_reduce(s.max(), dist.ReduceOp.MAX)  # against overflow; it cancels below
    q = torch.exp((s - shift) / epsilon).T  # (K, n)
    k, n = q.shape[0], q.shape[1] * common.world_size()
    q /= _all_reduce(q.sum())
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True)) * k  # each prototype gets mass 1/K ...
        q /= q.sum(dim=0, keepdim=True) * n  # ... and each sample 1/B (its column is local)
    return (q * n).T


def swav_loss(scores, codes, temperature=0.1):
    """Swapped prediction over all crops (Caron et al. 2020, Eq. 1-2 and Sec. 3.2, multi-crop):
        l(z_t, q_s) = -sum_k q_s^(k) log p_t^(k),  p_t^(k) = softmax_k(z_t^T c_k / tau),
        L = sum_{i in {1, 2}} sum_{v != i} l(z_v, q_i),
    averaged over the 2 code crops, the V-1 other crops and the b images (as the official code).
    scores: (V, b, K); codes: (2, b, K), without gradient. The codes are global already, so
    DDP's average of the per-process means is the single-process loss."""
    logp = F.log_softmax(scores.float() / temperature, dim=2)  # (V, b, K)
    loss = 0.0
    for i in range(codes.shape[0]):
        # (V-1, b, K), from slices: indexing with a Python list copies it host -> device every step
        others = torch.cat([logp[:i], logp[i + 1 :]])
        loss = loss - (codes[i] * others).sum(dim=2).mean()
    return loss / codes.shape[0]


@torch.no_grad()
def assign_codes(scores, queue, prototypes, epsilon, iterations):
    """Codes (2, b, K) of the two global crops. scores: (V, b, K); queue: (2, L, d) past z of
    the global crops on this process, or None: with a batch much smaller than K they fill the
    Sinkhorn batch, scored by today's prototypes (K, d), and are dropped after."""
    b = scores.shape[1]
    with torch.autocast(scores.device.type, enabled=False):  # float32 scores, as the batch's
        rows = [
            scores[i] if queue is None else torch.cat([scores[i], queue[i] @ prototypes.float().T])
            for i in range(2)
        ]
    return torch.stack([sinkhorn(s, epsilon, iterations)[:b] for s in rows])


def swav_views(size, args):
    """SwAV's multi-crop (Sec. 3.2): colour distortion at strength 1 (jitter 0.8/0.8/0.8/0.2
    with p 0.8, grey 0.2) and blur on every crop; 2 global crops of `size` and --local-crops
    small ones (96 px from 224 px images, else half the side)."""
    return common.multicrop_views(
        size, args.local_crops, args.global_scale, args.local_scale, blur_p=args.blur_prob
    )


# --- add-ons: Q-Score regularization and spatial cross-attention ------------------------
# The same text in every method script (tests/test_addons_block.py checks it), so that a
# copied script stands alone. Kalibhat et al. (Q-Score) and Seyfi et al. (cross-attention).
def add_addon_flags(p):
    add = p.add_argument  # the papers' values in parentheses; README explains each
    add("--qscore-lambda", type=float, default=0.0, help="Q-Score weight lambda (Eq. 4); 0: off")
    add("--qscore-alpha-quantile", type=float, default=0.25, help="quantile alpha: a departure")
    add("--qscore-alpha", type=float, default=0.2, help="with quantile 0: Eq. 4's fixed alpha")
    add("--qscore-eps", type=float, default=3.0, help="L_i: h_ij > mu_i + eps sigma_i (Eq. 2: 3)")
    add("--xattn", action="store_true", help="the spatial cross-attention add-on")
    add("--xattn-lr-scale", type=float, default=0.03 / 3.6, help="head lr / backbone lr (0.03/3.6)")
    add("--xattn-positives", type=int, default=1, help="positives P per image (Sec. 2.3)")
    add("--xattn-clusters", type=int, default=100, help="k-means clusters K_c (50-3000)")
    add("--xattn-cluster-every", type=common.at_least_one, default=1, help="k-means every N epochs")
    add("--xattn-temp", type=float, default=0.05, help="classifier temperature tau_c (Eq. 6: 0.05)")
    add("--xattn-w-mask", type=float, default=0.05, help="weight w1 of L_mu (Eq. 7: 0.05)")
    add("--xattn-w-cls", type=float, default=0.1, help="weight w2 of L_cls (Eq. 7: 0.1)")
    add("--xattn-mask", default="eq3", choices=["eq3", "cosine"], help="mu; cosine: a departure")


def qscore(h, eps=3.0):
    """Q-Score of each sample, label-free (Kalibhat et al., Eq. 2 and 3). h: (B, D), pooled;
    L2-normalized here. L_i = {j : h_ij > mu_i + eps sigma_i}; Q_i = mean_{j in L_i} (h_ij - mu_i).
    An empty L_i becomes the single largest feature for Q alone (Eq. 2 as eps falls; it keeps a
    gradient). Returns Q (B,) and the mask of L (B, D) as Eq. 2 gives it (empty: all False)."""
    h = F.normalize(h.float(), dim=1)
    mu, sigma = h.mean(1, keepdim=True), h.std(1, correction=0, keepdim=True)  # (B, 1)
    mask = h > mu + eps * sigma
    # the largest feature by scatter: F.one_hot would read its indices back to the host
    top = torch.zeros_like(mask).scatter_(1, h.argmax(1, keepdim=True), True)  # (B, D)
    used = torch.where(mask.any(1, keepdim=True), mask, top)
    q = ((h - mu) * used).sum(1) / used.sum(1)
    return q, mask


def qscore_regularizer(h, lam, alpha, eps=3.0, quantile=0.0):
    """Eq. 4's Q-Score term as a loss to add: -lambda * mean_i[1{Q_i < alpha} Q_i]. The indicator
    carries no gradient; Q_i does, so low-quality samples are pushed up and the rest left alone.
    quantile > 0: alpha is that quantile of the global batch's detached Q (gathered under DDP),
    a departure from the paper's fixed alpha (README). Returns the loss and device statistics."""
    q, mask = qscore(h, eps)
    if quantile > 0:
        alpha = torch.quantile(common.all_gather(q.detach()), quantile)
    low = (q < alpha).float().detach()
    loss = -lam * (low * q).mean()
    size = mask.sum(1)
    stats = {
        "qscore": q.mean().detach(),
        "qscore_active": size.float().mean(),
        "qscore_under_alpha": low.mean(),
        "qscore_empty": (size == 0).float().mean(),
    }
    return loss, stats


def qscore_stats(h, args):
    """The Q-Score statistics of a batch when the regularizer is off (no loss, no gradient)."""
    a = args
    return qscore_regularizer(
        h.detach(), 0.0, a.qscore_alpha, a.qscore_eps, a.qscore_alpha_quantile
    )[1]


def correlation_mask(f_s, f_p, form="eq3"):
    """Correlation mask mu (Seyfi et al., Eq. 3 and 4), the attention head's target. f_s: (B, D,
    H, W) the images' feature maps; f_p: (B, P, D, H', W') their P positives'. Eq. 3: rho_ij =
    (1/D) max over (i', j') of <f_s[:, i, j], f'[:, i', j']>; Eq. 4: mu, the mean over the
    positives. beta is a sigmoid, so mu is divided by one detached scale, its largest value in the
    global batch (every process): mu lies in [0, 1] and keeps Eq. 3's relative levels across
    positions, positives and images, so a weak, unrelated positive stays muted (never per image).
    form "cosine" (--xattn-mask cosine, a departure): the cosine of the channel vectors, which puts
    every position on one scale whatever its magnitude. No gradient (it supervises), float32.
    Returns mu (B, H, W)."""
    with torch.no_grad(), torch.autocast(f_s.device.type, enabled=False):
        b, _, hgt, wid = f_s.shape
        s, p = f_s.float().flatten(2), f_p.float().flatten(3)  # (B, D, HW), (B, P, D, H'W')
        if form == "cosine":
            s, p = F.normalize(s, dim=1), F.normalize(p, dim=2)  # unit vectors (0 if all 0)
        corr = torch.einsum("bdi,bpdj->bpij", s, p)  # (B, P, HW, H'W'): inner products
        mu = corr.max(dim=3).values.mean(dim=1).view(b, hgt, wid)  # best match, averaged
        if form == "eq3":  # over the global batch's largest value (Eq. 3's 1/D cancels in it)
            mu = mu / common.all_gather(mu.amax().view(1)).max().clamp_min(1e-12)
        return mu


class CrossAttentionHead(nn.Module):
    """Attention head and classifier (Seyfi et al., Sec. 2.3, App. 1.1): beta = sigmoid(conv1x1(
    relu(f))), one channel; f * beta pooled and classified over the K_c clusters, logits / tau_c.
    Dropped after training: backbone.pt never holds it."""

    def __init__(self, dim, clusters, temperature=0.05):
        super().__init__()
        self.attn = nn.Conv2d(dim, 1, kernel_size=1)
        self.classifier = nn.Linear(dim, clusters)
        self.temperature = temperature

    def forward(self, f):  # f (N, D, H, W) -> beta (N, 1, H, W), logits (N, K_c)
        beta = torch.sigmoid(self.attn(F.relu(f)))
        with torch.autocast(f.device.type, enabled=False):  # logits / 0.05: float32 always
            logits = self.classifier((f * beta).mean(dim=(2, 3)).float()) / self.temperature
        return beta, logits


def xattn_losses(f, beta, logits, labels, positives, mask="eq3"):
    """L_mu (Eq. 5) and L_cls (Eq. 6). f: (B + B*P, D, H, W), anchors then their positives;
    beta, logits: the head's outputs for those rows; labels: (B,) the anchors' pseudo-labels;
    mask: correlation_mask's form."""
    b = labels.shape[0]
    fs, fp = f[:b], f[b:].unflatten(0, (b, positives))  # (B, D, H, W), (B, P, D, H, W)
    loss_mask = F.mse_loss(beta[:b, 0].float(), correlation_mask(fs, fp, mask))
    targets = torch.cat([labels, labels.repeat_interleave(positives)])  # positives share them
    return loss_mask, F.cross_entropy(logits.float(), targets)


def xattn_groups(groups, model, scale):
    """The attention head's own optimizer groups (App. 1.2: lr_attn far below lr_core): each
    group gives the head's parameters to a copy of itself marked lr_scale (common.Run.schedule)."""
    head = {id(p) for n, p in model.named_parameters() if n.startswith("xattn.")}
    out = []
    for g in groups:
        params = list(g["params"])
        core, attn = [p for p in params if id(p) not in head], [p for p in params if id(p) in head]
        out += [{**g, "params": core}] if core else []
        out += [{**g, "params": attn, "lr_scale": scale}] if attn else []
    return out


def addon_losses(args, out, loss, pseudo, idx):
    """The method's loss plus the add-ons': Kalibhat et al. Eq. 4 and Seyfi et al. Eq. 7 (w1 L_mu
    + w2 L_cls). out: the model's h (and f, beta, logits with --xattn); pseudo: the run's
    common.PseudoLabels; idx: the batch's image indices. Returns (loss, terms, Q-Score stats)."""
    a, terms = args, {"loss_ssl": loss}
    if a.qscore_lambda > 0:
        terms["loss_qscore"], qstats = qscore_regularizer(
            out["h"], a.qscore_lambda, a.qscore_alpha, a.qscore_eps, a.qscore_alpha_quantile
        )
        loss = loss + terms["loss_qscore"]
    else:
        qstats = qscore_stats(out["h"], a)
    if a.xattn:
        f, beta, logits = out["f"], out["beta"], out["logits"]
        terms["loss_mask"], terms["loss_cls"] = xattn_losses(
            f, beta, logits, pseudo.labels[idx], a.xattn_positives, a.xattn_mask
        )
        loss = loss + a.xattn_w_mask * terms["loss_mask"] + a.xattn_w_cls * terms["loss_cls"]
    return loss, terms, qstats


# --- end add-ons


# --- training -----------------------------------------------------------------------
def check_args(args, ckpt):
    """SwAV's own check, before any work: a checkpoint to continue (None: a new run) holds the
    queue that --queue-size gives, in whole batches."""
    length = args.queue_size - args.queue_size % args.batch_size
    if ckpt is not None and ckpt["queue"].shape[1] != length:
        path = common.checkpoint_to_resume(args.resume, args.run_dir)  # the one check_run loaded
        raise common.UserError(
            f"--resume: '{path}' holds a queue of {ckpt['queue'].shape[1]}, "
            f"not --queue-size {args.queue_size}."
        )


def main(args):
    run = common.Run(args, METHOD, check=check_args)  # flags checked, device, processes, data
    run.loader(swav_views(run.size, args), positive=common.positive_view(run.size))
    model = SwAV(args, small_images=run.size <= 64).to(run.device)
    if args.sync_bn and run.distributed and run.cuda:  # BN over the global batch, as solo-learn
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if run.bf16:
        model = model.to(memory_format=torch.channels_last)
    groups = xattn_groups(
        common.param_groups(model, args.exclude_bias_norm), model, args.xattn_lr_scale
    )
    optimizer = common.LARS(
        groups, lr=0.0, weight_decay=args.weight_decay, eta=args.lars_eta, mode=args.lars_mode
    )
    # the queue: whole batches, as the official code; each process keeps its share of the rows
    queue_len = (args.queue_size - args.queue_size % args.batch_size) // run.world
    queue = torch.zeros(2, queue_len, args.proj_dim, device=run.device)  # past z, newest first
    saved = run.resume()
    if saved:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        lo = run.rank * queue_len
        queue.copy_(saved["queue"][:, lo : lo + queue_len])  # the global queue, split again
    pseudo = common.PseudoLabels(saved, run.device)  # --xattn's k-means labels
    # the codes are global (Sinkhorn's sums run over all processes), so DDP's mean of the
    # per-process losses is the loss of one process on the whole batch
    ddp = run.ddp(model)
    freeze = int(args.freeze_prototypes_epochs * run.epoch_steps)

    def state():  # called on every process: the queue is gathered from all of them
        queue_all = common.all_gather(queue.transpose(0, 1)).transpose(0, 1).cpu()  # (2, L*W, d)
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "queue": queue_all,
            **pseudo.state(),
        }

    def embed(m, x):  # the memory bank holds the normalized projections z that the prototypes score
        return F.normalize(m.projector(m.backbone(x)[1]), dim=1)

    for epoch in run.epochs(state, model.backbone):
        if args.xattn:
            pseudo.new_epoch(run, model, embed)
        model.train()
        for step, it, crops, idx, positives in run.steps():
            run.schedule(optimizer, it)
            with torch.no_grad():  # prototypes on the unit sphere, so z^T c is a cosine
                model.prototypes.weight.copy_(F.normalize(model.prototypes.weight, dim=1))
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
                out = ddp(crops, positives if args.xattn else None)
                b = crops[0].shape[0]
                scores = out["scores"].unflatten(0, (len(crops), b))  # (V, b, K)
                filled = (it - args.queue_start * run.epoch_steps) * b  # rows since it started
                use_queue = queue_len > 0 and filled >= queue_len  # in the Sinkhorn batch once full
                codes = assign_codes(
                    scores.detach(),
                    queue if use_queue else None,
                    model.prototypes.weight.detach(),
                    args.sinkhorn_epsilon,
                    args.sinkhorn_iters,
                )
                loss = swav_loss(scores, codes, args.temperature)
                loss, terms, qstats = addon_losses(args, out, loss, pseudo, idx)
            if queue_len and epoch >= args.queue_start:  # after its use: never in its own queue
                z = out["z"][: 2 * b].detach().float().unflatten(0, (2, b))  # (2, b, d)
                queue = torch.cat([z, queue[:, : queue_len - b]], 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if it < freeze:  # early prototypes would chase a random network: their grad is dropped
                model.prototypes.weight.grad = None
            optimizer.step()

            used = torch.full((), float(use_queue), device=run.device)  # a fill, not a host copy
            collapse = out["z"][: 2 * b].detach().float().std(0).mean()  # solo-learn's monitor
            terms.update(loss=loss, queue_used=used, collapse_std=collapse, **qstats)
            if (code := run.step_done(loss, terms, b)) is not None:
                return code
        if (code := run.end_epoch(model.backbone)) is not None:
            return code
    return run.finish()


if __name__ == "__main__":
    common.main_of(main, parse_args)
