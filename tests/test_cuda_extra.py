"""More CUDA-only paths covered on the CPU (issue 14): SyncBatchNorm conversion at world size 1 of
the momentum copies (EMA pairing, checkpoint round trip), the auto data-path budget rule with a
stand-in GPU, and the compiled multi-crop tensor loader's graph count."""

import importlib
import types

import pytest
import torch
import torch.nn as nn

import common


def _build(script, sync_bn, seed=0):
    """(online, momentum copy, EMA call, checkpoint parts) built as the script's main() does, with
    the SyncBatchNorm conversion of `--sync-bn` under CUDA + DDP when sync_bn. Each EMA pair is
    (momentum module, online module, prefix map: momentum parameter name -> online parameter
    name)."""
    mod = importlib.import_module(script)
    args = mod.parse_args(["--moco-version", "3"] if script == "moco" else [])
    torch.manual_seed(seed)
    cls = {"byol": "BYOL", "dino": "DINO", "moco": "MoCo"}[script]
    model = getattr(mod, cls)(args, small_images=True)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if script == "byol":  # the target lives inside the model, converted with it
        copy = model
        ema = lambda tau: (
            mod.ema_update(model.target_backbone, model.backbone, tau),
            mod.ema_update(model.target_projector, model.projector, tau),
        )
        pairs = {"target_backbone.": "backbone.", "target_projector.": "projector."}
        parts = {"model": model}
    elif script == "dino":  # built after the conversion, as in main()
        copy = mod.Teacher(model)
        ema = lambda m: mod.ema_update(copy, model, m)
        pairs = {"": ""}
        parts = {"model": model, "teacher": copy}
    else:
        copy = mod.KeyEncoder(model)
        ema = lambda tau: mod.ema_update(model, copy, tau)
        pairs = {"": ""}
        parts = {"model": model, "key_encoder": copy}
    return model, copy, ema, pairs, parts


def _online_name(name, pairs):
    k = max((k for k in pairs if name.startswith(k)), key=len)
    return pairs[k] + name[len(k) :]


@pytest.mark.parametrize("script", ["byol", "dino", "moco"])
def test_sync_bn_conversion_keeps_ema_pairs_and_checkpoints(script):
    """SyncBatchNorm conversion on the CPU (no train-mode forward: that needs a process group).
    (a) The script's own EMA still pairs each momentum parameter with the online parameter of the
    same name and shape, as before the conversion: compared with a hand EMA by name.
    (b) Every checkpointed module's state_dict loads strictly into the unconverted model and back,
    tensors equal: a multi-GPU SyncBN checkpoint resumes in one process, and the other way round."""
    plain, plain_copy, _, pairs, plain_parts = _build(script, sync_bn=False)
    model, copy, ema, _, parts = _build(script, sync_bn=True)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in copy.modules()), (
        "the momentum copy was not converted"
    )
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain_copy.modules())

    # (a) parameter order and shapes unchanged by the conversion, online and momentum copy alike
    shapes = lambda net: [(n, tuple(p.shape)) for n, p in net.named_parameters()]
    assert shapes(model) == shapes(plain)
    assert shapes(copy) == shapes(plain_copy)
    online = dict(model.named_parameters())
    momentum = [(n, p) for n, p in copy.named_parameters() if any(n.startswith(k) for k in pairs)]
    assert momentum
    with torch.no_grad():  # every parameter moves away from the others, a different step each
        g = torch.Generator().manual_seed(1)
        for p in online.values():
            p.add_(torch.randn(p.shape, generator=g))
    tau = 0.9
    expected = {
        n: tau * p.detach().clone() + (1 - tau) * online[_online_name(n, pairs)].detach()
        for n, p in momentum
    }
    for n, p in momentum:
        assert p.shape == online[_online_name(n, pairs)].shape, n
    ema(tau)
    for n, p in momentum:
        torch.testing.assert_close(
            p, expected[n], rtol=0, atol=1e-6, msg=f"EMA of {n} paired with another parameter"
        )

    # (b) state_dict round trip between the converted and the unconverted model
    for key, net in parts.items():
        state = {k: v.clone() for k, v in net.state_dict().items()}
        target = plain_parts[key]
        target.load_state_dict(state, strict=True)
        assert target.state_dict().keys() == state.keys(), key
        for k, v in target.state_dict().items():
            assert torch.equal(v, state[k]), f"{key}.{k}"
        _, _, _, _, fresh = _build(script, sync_bn=True, seed=2)
        fresh[key].load_state_dict(target.state_dict(), strict=True)
        for k, v in fresh[key].state_dict().items():
            assert torch.equal(v, state[k]), f"{key}.{k} after the way back"


def test_auto_data_path_budget(monkeypatch):
    """auto: the tensor path on a CUDA device when the decoded size is at most
    min(TENSOR_MAX_BYTES, a quarter of the GPU's memory), the CPU pipeline above it, undecodable
    data sets and CPU devices; explicit choices are kept."""
    size = {"bytes": 0}
    monkeypatch.setattr(common, "estimate_bytes", lambda ds: size["bytes"])
    gpu = {"memory": 80 * 2**30}  # a quarter: 20 GiB, above the 8 GiB limit
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda d: types.SimpleNamespace(total_memory=gpu["memory"]),
    )
    cuda, cpu, limit = torch.device("cuda", 0), torch.device("cpu"), common.TENSOR_MAX_BYTES

    def auto(n, device=cuda):
        size["bytes"] = n
        return common.resolve_data_path("auto", object(), device)

    assert auto(limit - 1) == "tensor"
    assert auto(limit) == "tensor"
    assert auto(limit + 1) == "cpu"
    assert auto(50 * 2**20, cpu) == "cpu" and auto(limit + 1, cpu) == "cpu"
    assert auto(None) == "cpu"
    gpu["memory"] = 16 * 2**30  # a quarter (4 GiB) below the limit binds
    assert auto(4 * 2**30) == "tensor" and auto(4 * 2**30 + 1) == "cpu"
    size["bytes"] = limit + 1
    assert common.resolve_data_path("tensor", object(), cuda) == "tensor"
    assert common.resolve_data_path("cpu", object(), cuda) == "cpu"
    monkeypatch.undo()

    # the real estimate of a real data set (digits, 1437 images of 3 x 32 x 32 bytes) against a
    # lowered limit
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda d: types.SimpleNamespace(total_memory=80 * 2**30),
    )
    train = common.make_dataset("digits", "", train=True)
    need = common.estimate_bytes(train)
    assert need == len(train) * 3 * 32 * 32
    assert common.resolve_data_path("auto", train, cuda) == "tensor"
    monkeypatch.setattr(common, "TENSOR_MAX_BYTES", need - 1)
    assert common.resolve_data_path("auto", train, cuda) == "cpu"


def test_compiled_multicrop_tensor_loader_stays_within_few_graphs(monkeypatch):
    """TrainLoader(compile=True) on the tensor path with 2 global + 2 local crops (2 sizes), the
    torch.compile it calls given a backend that counts graph compilations (eager underneath):
    a few graphs in the first batches, none after, whatever the number of batches."""
    torch._dynamo.reset()
    graphs, real_compile = [], torch.compile

    def counting_backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    def compile_counting(fn, **kw):
        kw["backend"] = counting_backend
        return real_compile(fn, **kw)

    monkeypatch.setattr(torch, "compile", compile_counting)
    views = common.multicrop_views(16, 2)
    assert len({v.size for v in views}) == 2
    train = torch.utils.data.Subset(common.make_dataset("digits", "", train=True), range(64))
    loader = common.TrainLoader(
        train,
        views,
        8,
        common.STATS["digits"],
        torch.device("cpu"),
        workers=0,
        data_path="tensor",
        compile=True,
    )
    assert loader.apply is not common.apply_view
    per_batch = []
    try:
        for epoch in range(2):
            loader.set_epoch(epoch)
            for crops, idx, _ in loader:
                per_batch.append(len(graphs))
                assert [c.shape[-1] for c in crops] == [v.size for v in views]
    finally:
        torch._dynamo.reset()
    assert len(per_batch) == 16
    assert 1 <= per_batch[0] <= 4, per_batch
    assert per_batch[-1] == per_batch[0], f"graphs recompiled as batches went on: {per_batch}"
