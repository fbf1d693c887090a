"""The CUDA-only paths, covered on the CPU with stand-ins: the losses (and every autocast guard)
in float32 under bf16 autocast, one step of every model in the CUDA configuration (bf16 autocast
+ channels_last), one decoded copy of a split, kept on the device only, the set-up checks that
only bite under CUDA and several processes, the sharded kNN, and the momentum updates' multi-
tensor kernels and MoCo's one all-reduce of BN statistics. That no step waits for the host (no
device constant built per batch, no .item()) is tests/test_host_sync.py's."""

import importlib
import os

import pytest
import torch

import common

SCRIPTS = ["simclr", "moco", "byol", "simsiam", "swav", "dino"]
STEP = [
    "--dataset",
    "digits",
    "--image-size",
    "16",
    "--batch-size",
    "4",
    "--epochs",
    "1",
    "--workers",
    "0",
    "--warmup-epochs",
    "0",
    "--knn-every",
    "0",
    "--data-path",
    "tensor",
    "--backbone",
    "resnet18-eighth",
]


def _leaf(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _losses():
    """(name, inputs, function of the inputs -> scalar): every loss of every script, DINO's
    last layer, SwAV's scores (of the batch and of its queue), and the add-ons' correlation
    mask, classifier and losses: each autocast guard of the scripts is in one of them."""
    import byol
    import dino
    import moco
    import simclr
    import simsiam
    import swav

    b, d, k = 8, 16, 32
    codes = swav.sinkhorn(torch.randn(2 * b, k)).view(2, b, k)
    queue = torch.nn.functional.normalize(torch.randn(64, d), dim=1)
    head = dino.DINOHead(d, 32, d, k)
    head.mlp = (
        torch.nn.Identity()
    )  # the MLP is the model's, in bf16 on purpose: only the last layer here
    labels = torch.arange(b) % 5

    class Pooled(torch.nn.Module):  # SwAV's backbone, stood in for: the crops are already h (n, d)
        def forward(self, x):
            return x[:, :, None, None], x

    sw = swav.SwAV(
        swav.parse_args(
            ["--backbone", "resnet18-eighth", "--prototypes", str(k), "--proj-dim", str(d)]
        ),
        small_images=True,
    )
    sw.backbone, sw.projector = Pooled(), torch.nn.Identity()  # the prototypes' product alone
    prototypes = torch.nn.functional.normalize(torch.randn(k, d), dim=1)
    past = torch.nn.functional.normalize(torch.randn(2, 3 * b, d), dim=2)  # SwAV's queue (2, L, d)
    yield (
        "nt_xent",
        [_leaf(b, d), _leaf(b, d, seed=1)],
        lambda z1, z2: simclr.nt_xent_loss(z1, z2, 0.2),
    )
    yield (
        "infonce_queue",
        [_leaf(b, d), _leaf(b, d, seed=1)],
        lambda q, kk: moco.infonce_loss(q, kk, queue, 0.2),
    )
    yield (
        "moco_v3",
        [_leaf(2 * b, d), _leaf(2 * b, d, seed=1)],
        lambda q, kk: moco.moco_loss(q, kk, None, 0.2),
    )
    yield "byol", [_leaf(b, d, seed=s) for s in range(4)], byol.regression_loss
    yield "simsiam", [_leaf(b, d, seed=s) for s in range(4)], simsiam.negative_cosine_loss
    yield "swav", [_leaf(4, b, k)], lambda s: swav.swav_loss(s, codes, 0.1)
    yield (
        "swav.scores",
        [_leaf(2 * b, d)],
        lambda h: swav.swav_loss(sw(list(h.split(b)))["scores"].unflatten(0, (2, b)), codes, 0.1),
    )
    yield (
        "swav.queue_codes",
        [_leaf(2, b, k)],
        lambda s: swav.swav_loss(s, swav.assign_codes(s.detach(), past, prototypes, 0.05, 3), 0.1),
    )
    yield (
        "dino",
        [_leaf(4 * b, k), _leaf(2 * b, k, seed=1)],
        lambda s, t: dino.dino_loss(s, t, torch.zeros(1, k), 0.1, 0.04),
    )
    yield (
        "dino_head",
        [_leaf(4 * b, d)],
        lambda h: dino.dino_loss(
            head(h)[1], head(h[: 2 * b])[1].detach(), torch.zeros(1, k), 0.1, 0.04
        ),
    )
    for name in SCRIPTS:
        mod = importlib.import_module(name)
        yield (
            f"{name}.correlation_mask",
            [_leaf(b, d, 4, 4)],
            lambda f, m=mod: (
                m.correlation_mask(f, f.detach().roll(1, 0)[:, None]).pow(2).sum() + f.sum()
            ),
        )
    for name in SCRIPTS:
        xhead = importlib.import_module(name).CrossAttentionHead(d, 5)
        torch.nn.init.zeros_(xhead.attn.weight)  # beta = 0.5 in any precision: the classifier alone
        torch.nn.init.zeros_(xhead.attn.bias)
        yield (
            f"{name}.xattn_classifier",
            [_leaf(2 * b, d, 4, 4)],
            (lambda f, x=xhead: x(f)[1].logsumexp(1).mean()),
        )
    yield (
        "xattn_losses",
        [_leaf(2 * b, d, 4, 4), _leaf(2 * b, 1, 4, 4, seed=1), _leaf(2 * b, 5, seed=2)],
        (lambda f, beta, logits: sum(simclr.xattn_losses(f, beta.sigmoid(), logits, labels, 1))),
    )


@pytest.mark.parametrize("name", [n for n, _, _ in _losses()])
def test_each_loss_is_float32_under_bf16_autocast(name):
    """Under CPU bf16 autocast (the CUDA configuration's stand-in) each loss returns float32, equal
    to its float32 value and gradient: its products run outside autocast, as SwAV's scores do.
    A product left in bf16 misses by about 1e-2 (DINO: 8.4375 for 8.4176)."""
    _, inputs, fn = next(x for x in _losses() if x[0] == name)
    ref = fn(*inputs)
    ref_grads = torch.autograd.grad(ref, inputs, allow_unused=True)  # targets and keys get none
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, allow_unused=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


CONFIGS = [
    ["simclr"],
    ["moco", "--moco-version", "2"],
    ["moco", "--moco-version", "3"],
    ["byol"],
    ["simsiam"],
    ["swav"],
    ["dino"],
]


@pytest.mark.parametrize("config", CONFIGS, ids=" ".join)
def test_one_step_in_the_cuda_configuration(monkeypatch, tmp_path, config):
    """--precision bf16 on the CPU: the CUDA configuration (bf16 autocast, channels_last model and
    crops) for one step at 16 px, batch 4, with both add-ons; the backbone really ran under
    autocast on channels_last input, and the logged loss is finite."""
    import json
    import math

    mod = importlib.import_module(config[0])
    seen, real_forward = [], common.Backbone.forward

    def recording(self, x):
        seen.append(
            (
                torch.is_autocast_enabled("cpu"),
                x.is_contiguous(memory_format=torch.channels_last),
                self.stem[0].weight.is_contiguous(memory_format=torch.channels_last),
            )
        )
        return real_forward(self, x)

    monkeypatch.setattr(common.Backbone, "forward", recording)
    decoded, real_decode = [], common.decode_uint8

    def decode(dataset, device=torch.device("cpu")):
        decoded.append(dataset)
        return real_decode(dataset, device)

    monkeypatch.setattr(common, "decode_uint8", decode)
    args = mod.parse_args(
        config[1:]
        + STEP
        + [
            "--steps-per-epoch",
            "1",
            "--precision",
            "bf16",
            "--qscore-lambda",
            "0.1",
            "--xattn",
            "--xattn-clusters",
            "4",
            "--knn-every",
            "1",
            "--knn-limit",
            "16",
            "--run-dir",
            str(tmp_path),
        ]
    )
    assert mod.main(args) == 0
    assert (True, True, True) in seen
    # the training split (the loader, the k-means bank, the kNN bank's 16 images) and the test split
    assert len({id(d) for d in decoded}) == 2, (
        "the kNN bank decoded its own copy of the training split"
    )
    with open(tmp_path / "metrics.jsonl") as fh:
        metrics = json.loads(fh.readline())
    assert (
        math.isfinite(metrics["loss"])
        and math.isfinite(metrics["loss_mask"])
        and math.isfinite(metrics["loss_cls"])
    )
    assert 0 <= metrics["knn_top1"] <= 1


def test_eval_dataset_is_the_training_split_itself():
    """Fix 3: kNN's bank and the training data are one object, so one decoded copy; a fixed
    subset of it reads the rows of that copy (the decode cache gets no entry of its own)."""
    train = common.make_dataset("digits", "", train=True)
    assert common.eval_dataset("digits", "", train_set=train) is train
    images = common.decode_uint8(train)
    bank = torch.utils.data.Subset(train, [5, 3, 200])
    net = common.build_backbone("resnet18", small_images=True).eval()
    args = (32, common.STATS["digits"], 32, torch.device("cpu"))
    h, y = common.extract_features(
        net, bank, *args, workers=0, data_path="tensor", precision="fp32"
    )
    assert bank not in common._DECODED and common.decode_uint8(train) is images
    assert y.tolist() == [train.targets[i] for i in (5, 3, 200)]
    ref, _ = common.extract_features(net, bank, *args, workers=0, data_path="cpu", precision="fp32")
    torch.testing.assert_close(h, ref, rtol=1e-4, atol=1e-4)


def test_extract_features_precision():
    """bf16 runs the backbone under autocast; the features come back float32 either way and
    agree."""
    net = common.build_backbone("resnet18", small_images=True).eval()
    ds = torch.utils.data.Subset(common.make_dataset("digits", "", train=True), range(8))
    out = {
        p: common.extract_features(
            net,
            ds,
            16,
            common.STATS["digits"],
            32,
            torch.device("cpu"),
            workers=0,
            data_path="tensor",
            precision=p,
        )[0]
        for p in ("fp32", "bf16")
    }
    assert out["fp32"].dtype == out["bf16"].dtype == torch.float32
    assert not torch.equal(out["fp32"], out["bf16"])
    torch.testing.assert_close(out["bf16"], out["fp32"], rtol=0.1, atol=0.1)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("script", SCRIPTS)
def test_cuda_setup_keeps_float32_products_float32(monkeypatch, tmp_path, script):
    """Fix 6, with a stand-in GPU up to the data: main() asks for 'highest' float32 matmul
    precision (no TF32 for the losses' and SwAV's float32 products); convolutions keep TF32."""
    mod = importlib.import_module(script)
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch, "manual_seed", lambda s: None)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", asked.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)

    def stop(*a, **k):
        raise _Stop

    monkeypatch.setattr(common, "make_dataset", stop)
    with pytest.raises(_Stop):
        mod.main(mod.parse_args(["--run-dir", str(tmp_path)]))
    assert asked == ["highest"]


@pytest.mark.parametrize("config", CONFIGS, ids=" ".join)
def test_compile_with_sync_bn_under_ddp_is_refused(monkeypatch, config):
    """Fix 5: --compile + SyncBatchNorm + DDP on CUDA (an open PyTorch bug) gets one sentence,
    before any work; wherever SyncBatchNorm would not apply (CPU, one process, --no-sync-bn,
    MoCo v2's shuffled BN), --compile is allowed."""
    mod = importlib.import_module(config[0])
    check = lambda a: common.check_run(a, mod.METHOD, getattr(mod, "check_args", None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = mod.parse_args(config[1:] + ["--compile"])
    if args.sync_bn:
        with pytest.raises(common.UserError, match="--compile with SyncBatchNorm under DDP"):
            check(args)
    else:
        assert check(args) == (None, None)  # MoCo v2: shuffled BN, no SyncBatchNorm
    for ok in (["--no-sync-bn"], ["--device", "cpu"]):
        assert check(mod.parse_args(config[1:] + ["--compile"] + ok)) == (None, None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert check(mod.parse_args(config[1:] + ["--compile"])) == (None, None)


def _sharded_knn(rank, world, bank, bank_y, query, query_y, k):
    share = -(-len(bank) // world)  # extract_features(gather=False)'s contiguous shares
    mine = slice(rank * share, (rank + 1) * share)
    scores = common.MemoryBank.knn_predict(query, bank[mine], bank_y[mine], 5, k=k, sharded=True)
    top1 = common.knn_top1(bank[mine], bank_y[mine], query, query_y, 5, k=k, chunk=7, sharded=True)
    return len(bank[mine]), scores, top1


@pytest.mark.parametrize("n,k", [(41, 10), (41, 30), (3, 10), (1, 10), (1, 1)])
def test_sharded_knn_matches_one_process(n, k):
    """Fix 4: 2 gloo processes, each with half the bank (the last share may be smaller than k,
    or empty: n = 1 gives shares of 1 and 0 rows), give the scores and top-1 of one process
    holding the whole bank."""
    from conftest import spawn

    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(n, 8, generator=g), torch.randn(20, 8, generator=g)
    bank_y, query_y = (
        torch.randint(0, 5, (n,), generator=g),
        torch.randint(0, 5, (20,), generator=g),
    )
    ref = common.MemoryBank.knn_predict(query, bank, bank_y, 5, k=k)
    ref_top1 = common.knn_top1(bank, bank_y, query, query_y, 5, k=k)
    results = spawn(_sharded_knn, bank, bank_y, query, query_y, k)
    shares = [r[0] for r in results]
    assert sum(shares) == n and (n > 1 or shares == [1, 0]), shares
    for _, scores, top1 in results:
        torch.testing.assert_close(scores, ref, rtol=1e-5, atol=1e-5)
        assert top1 == ref_top1


def _shares(rank, world):
    net = common.build_backbone("resnet18", small_images=True).eval()
    ds = torch.utils.data.Subset(common.make_dataset("digits", "", train=True), range(7))
    return common.extract_features(
        net,
        ds,
        16,
        common.STATS["digits"],
        32,
        torch.device("cpu"),
        batch_size=4,
        workers=0,
        data_path="tensor",
        gather=False,
    )


def test_extract_features_shares_without_padding():
    """gather=False: each process's contiguous share, the padding dropped; together the whole
    split."""
    from conftest import spawn

    (h0, y0), (h1, y1) = spawn(_shares)
    assert len(h0) == 4 and len(h1) == 3
    ds = torch.utils.data.Subset(common.make_dataset("digits", "", train=True), range(7))
    assert torch.cat([y0, y1]).tolist() == common.targets_of(ds).tolist()


def test_knn_bank_defaults():
    """The folder default of --knn-limit; a fixed subset of the training split itself."""
    train = common.make_dataset("digits", "", train=True)
    assert common.knn_bank("digits", "", train) is train
    assert common.knn_bank("digits", "", train, 0) is train
    sub = common.knn_bank("digits", "", train, 100)
    assert (
        sub.dataset is train
        and len(sub) == 100
        and sub.indices == common.knn_bank("digits", "", train, 100).indices
    )
    assert common.KNN_LIMIT_FOLDER == 50000


def test_knn_bank_of_a_folder_is_limited_by_default(tmp_path, monkeypatch):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / split / c)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    monkeypatch.setattr(common, "KNN_LIMIT_FOLDER", 4)
    train = common.make_dataset("folder", str(tmp_path), train=True)
    bank = common.knn_bank("folder", str(tmp_path), train)
    assert bank.dataset is train and len(bank) == 4
    assert common.knn_bank("folder", str(tmp_path), train, 0) is train


# --- momentum updates in multi-tensor kernels ---------------------------------------------------
def _ema_pairs(script):
    """(update(tau) with the script's ema_update, [(moving, online)] parameters) of a model whose
    online weights were moved away from the copy's, so that every product counts."""
    import copy

    mod = importlib.import_module(script)
    args = mod.parse_args(
        ["--backbone", "resnet18-eighth", "--proj-hidden", "64", "--proj-dim", "32"]
    )
    torch.manual_seed(0)
    if script == "moco":
        model = mod.MoCo(args, small_images=True)
        moving = mod.KeyEncoder(model)
        online = list(model.backbone.parameters()) + list(model.projector.parameters())
        update = lambda tau: mod.ema_update(model, moving, tau)
    elif script == "byol":
        model = mod.BYOL(args, small_images=True)
        moving = torch.nn.ModuleList([model.target_backbone, model.target_projector])
        online = list(model.backbone.parameters()) + list(model.projector.parameters())
        update = lambda tau: (
            mod.ema_update(model.target_backbone, model.backbone, tau),
            mod.ema_update(model.target_projector, model.projector, tau),
        )
    else:
        model = mod.DINO(args, small_images=True)
        moving = mod.Teacher(model)
        online = list(model.backbone.parameters()) + list(model.head.parameters())
        update = lambda tau: mod.ema_update(moving, model, tau)
    with torch.no_grad():
        for p in online:
            p.add_(torch.randn_like(p) * 0.1)
    return update, moving, list(zip(copy.deepcopy(moving).parameters(), online))


@pytest.mark.parametrize("script", ["moco", "byol", "dino"])
def test_ema_update_in_foreach_kernels_equals_the_loop(script):
    """torch._foreach_mul_ / _foreach_add_ (one kernel per operation on CUDA) give bit for bit
    the per-parameter loop's mul_(tau).add_(online, alpha=1 - tau), step after step: the same
    arithmetic, so a resumed run still ends where an unbroken one does."""
    update, moving, loop = _ema_pairs(script)
    for tau in (0.99, 0.996, 0.9995):
        update(tau)
        with torch.no_grad():
            for t, o in loop:
                t.mul_(tau).add_(o.detach(), alpha=1 - tau)
        assert all(torch.equal(a, t) for a, (t, _) in zip(moving.parameters(), loop))
    assert not torch.equal(loop[0][0], loop[0][1])  # the copy moved towards, not onto, the online


# --- MoCo's key encoder: BN statistics averaged in one all-reduce -------------------------------
def _buffer_average(rank, world, sync_bn):
    import copy

    import torch.distributed as dist
    from torch import nn

    net = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6)
    )
    if sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    g = torch.Generator().manual_seed(rank)  # each process's own statistics
    for name, b in net.named_buffers():
        b.copy_(
            torch.full_like(b, rank + 1)
            if name.endswith("num_batches_tracked")
            else torch.rand(b.shape, generator=g) * 3
        )
    before, per_buffer = {k: b.clone() for k, b in net.named_buffers()}, copy.deepcopy(net)
    for b in per_buffer.buffers():  # the loop it replaces: one all-reduce per floating buffer
        if b.is_floating_point():
            dist.all_reduce(b)
            b.div_(world)
    calls, real = [], dist.all_reduce

    def counting(*a, **k):
        calls.append(a[0].numel())
        return real(*a, **k)

    dist.all_reduce = counting
    try:
        common.average_buffers(net)
    finally:
        dist.all_reduce = real
    return before, dict(per_buffer.named_buffers()), dict(net.named_buffers()), calls


def test_moco_buffers_are_averaged_in_one_all_reduce():
    """2 gloo processes with different BN statistics: the flattened all-reduce gives bit for bit
    the per-buffer averages (running means and variances; the batch counters stay each process's),
    in one collective of all 20 numbers."""
    from conftest import spawn

    for before, per_buffer, flat, calls in spawn(_buffer_average, False):
        assert calls == [4 + 4 + 6 + 6] and len(flat) == 6
        for k in flat:
            assert torch.equal(flat[k], per_buffer[k]), k
            if k.endswith("num_batches_tracked"):
                assert torch.equal(flat[k], before[k])
            else:
                assert not torch.equal(flat[k], before[k])


def test_moco_buffers_under_sync_bn_are_left_alone():
    """Under SyncBatchNorm every process's statistics are the global batch's already: no
    collective, no change."""
    from conftest import spawn

    for before, _, after, calls in spawn(_buffer_average, True):
        assert calls == []
        assert all(torch.equal(after[k], before[k]) for k in before)


# --- the tensor path keeps one copy of the data set, on the device --------------------------------
def test_a_data_set_on_the_device_keeps_no_host_copy():
    """The 'meta' device stands in for a GPU: the training loader's decoded copy is the device's
    only, and a Subset's (a kNN bank's) leaves no host copy of itself or of its base behind; a
    host copy asked for before stays, and is the one moved."""
    meta = torch.device("meta")
    train = common.make_dataset("digits", "", train=True)
    views = common.simclr_views(16)
    loader = common.TrainLoader(
        train, views, 8, common.STATS["digits"], meta, workers=0, data_path="tensor"
    )
    assert loader.images.device == meta and loader.images.shape == (1437, 3, 32, 32)
    assert set(common._DECODED[train]) == {"meta"}
    assert common.decode_uint8(train, meta) is loader.images
    other = common.make_dataset("digits", "", train=True)
    bank = torch.utils.data.Subset(other, [5, 3, 200])
    assert common.decode_uint8(bank, meta).shape == (3, 3, 32, 32)
    assert set(common._DECODED[bank]) == {"meta"} and "cpu" not in common._DECODED.get(other, {})
    host = common.decode_uint8(train)  # asked for on the host: cached, and the next device's source
    assert common.decode_uint8(train, torch.device("meta", 1)).shape == host.shape
    assert common._DECODED[train]["cpu"] is host
