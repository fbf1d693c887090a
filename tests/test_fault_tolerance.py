"""What clusters do to runs (issue 11): a stop signal mid-epoch, a worker killed under torchrun with
--max-restarts, unreadable images in a folder, a full disk, a resume with other flags or another
number of processes. Each run is tiny and shared between the assertions that read it."""

import errno
import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import REPO, free_port, read_metrics, run, run_here, spawn

SCRIPTS = ["simclr", "moco", "byol", "simsiam", "swav", "dino"]
# 2 epochs of 3 steps at 8 px with narrow heads; no kNN pass, a progress line every step
BASE = [
    "--dataset",
    "digits",
    "--image-size",
    "8",
    "--batch-size",
    "16",
    "--steps-per-epoch",
    "3",
    "--epochs",
    "2",
    "--workers",
    "0",
    "--knn-every",
    "0",
    "--log-every",
    "1",
    "--backbone",
    "resnet18-eighth",
]
# one script of each family: contrastive, momentum teacher, multi-crop with a queue (full from
# step 2)
FAMILY = {
    "simclr": ["--proj-hidden", "64", "--proj-dim", "32"],
    "byol": ["--proj-hidden", "64", "--pred-hidden", "64", "--proj-dim", "32"],
    "swav": [
        "--local-crops",
        "2",
        "--prototypes",
        "30",
        "--proj-hidden",
        "64",
        "--proj-dim",
        "32",
        "--queue-size",
        "32",
        "--queue-start",
        "0",
        "--freeze-prototypes-epochs",
        "0.5",
    ],
}
# One thread a process: these runs are too small to gain from two, and beside another busy process
# two threads spin-wait on each other (tens of times slower). The results are the same bit for bit.
ONE = {"OMP_NUM_THREADS": "1"}


def argv(script, *extra):
    return [f"{script}.py"] + BASE + FAMILY[script] + list(extra)


def assert_same_state(a, b):
    """Two checkpoints (or backbone state_dicts) hold bitwise the same tensors."""
    if "model" in a:
        for part in ("model", "teacher", "key_encoder"):
            if part in a:
                assert_same_state(a[part], b[part])
        for part in ("queue", "center"):
            if part in a:
                assert torch.equal(a[part], b[part]), part
        return
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def stop_with_sigterm(args, at):
    """Run `python ARGS` until it sends itself SIGTERM after step `at` ("EPOCH:STEP", the test hook
    of common.RunControl: that step, whatever the machine's speed); return (exit code, stdout)."""
    env = {**os.environ, **ONE, "CLEANSSL_TEST_SIGNAL": f"SIGTERM@{at}"}
    p = subprocess.run(
        [sys.executable] + args,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    return p.returncode, p.stdout


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The unbroken runs that the broken ones must reproduce, one per family."""
    root = tmp_path_factory.mktemp("straight")
    done = {}
    for script in FAMILY:
        run_here(argv(script, "--run-dir", str(root / script)), env=ONE)
        done[script] = root / script
    return done


@pytest.mark.parametrize("script", list(FAMILY))
def test_sigterm_mid_epoch_then_resume_ends_with_the_unbroken_weights(script, straight, tmp_path):
    d = tmp_path / "run"
    code, out = stop_with_sigterm(argv(script, "--run-dir", str(d)), at="1:2")  # a full SwAV queue
    assert code == common.EXIT_STOPPED, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at epoch 1 step 2/3; "), out
    assert f"checkpoint in {d};" in last, out
    mid = load(d / "checkpoint.pt")
    assert mid["epoch"] == 0 and mid["at"]["step"] == 2, mid["at"]  # in epoch 1, the step chosen
    assert not (d / "backbone.pt").exists() and not (d / "checkpoint.pt.tmp").exists()
    # the same command again: --run-dir holds a checkpoint, so it continues
    p = run_here(argv(script, "--run-dir", str(d)), env=ONE)
    assert f"resuming {d} at epoch 1 step 2\n" in p.stdout
    a, b = load(straight[script] / "checkpoint.pt"), load(d / "checkpoint.pt")
    assert b["epoch"] == 2 and b["at"] is None
    assert_same_state(a, b)  # model, optimizer-free parts: target (BYOL) and queue (SwAV) included
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(x["momentum"], y["momentum"])
    assert_same_state(load(straight[script] / "backbone.pt"), load(d / "backbone.pt"))
    # and the epochs' metrics, which the checkpoint carried across the stop, as the unbroken run's
    ma, mb = read_metrics(straight[script]), read_metrics(d)
    assert [m["epoch"] for m in mb] == [1, 2]
    for x, y in zip(ma, mb):
        assert {k: v for k, v in x.items() if k.startswith("loss")} == {
            k: v for k, v in y.items() if k.startswith("loss")
        }
    if script == "swav":
        assert all(
            m["queue_used"] > 0 for m in mb
        )  # the queue was in use on both sides of the stop


def test_same_seed_twice_gives_the_same_losses_and_backbone(straight, tmp_path):
    """Twice the simclr run with its seed, the second with 2 DataLoader workers: the crops depend on
    (seed, epoch, step, place in the batch), not on which worker made them."""
    run_here(argv("simclr", "--workers", "2", "--run-dir", str(tmp_path / "again")), env=ONE)
    losses = lambda d: [
        {k: v for k, v in m.items() if k.startswith("loss")} for m in read_metrics(d)
    ]
    assert losses(straight["simclr"]) == losses(tmp_path / "again")
    assert_same_state(
        load(straight["simclr"] / "backbone.pt"), load(tmp_path / "again" / "backbone.pt")
    )


# ------------------------------------------------------------------ torchrun, a worker killed
def torchrun_cmd(args, restarts=0):
    """With the c10d rendezvous and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (see `killed`) every round
    of the rendezvous has a store of its own; the store that --master-addr's static rendezvous
    shares with the workers keeps the last round's addresses, and a restarted worker can connect
    to a dead one's (pytorch/pytorch#135712)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--max-restarts={restarts}",
        "--monitor-interval=0.1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "simclr.py",
        "--device",
        "cpu",
    ] + args


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """simclr on 2 gloo processes, unbroken; and the same run with --max-restarts 1, a checkpoint at
    every meeting of the processes (the first is after step 1), and rank 1 killed by SIGKILL after
    step 2 of epoch 1 (common.RunControl's test hook: in the first attempt only, whatever the
    machine's speed). Also the same kill without restarts, whose step-1 checkpoint stays for a
    resume on 1 process (the restarted workers above replace theirs)."""
    root = tmp_path_factory.mktemp("torchrun")
    args = argv("simclr")[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run(
        torchrun_cmd(args + ["--run-dir", str(root / "straight")]),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    env["CLEANSSL_TEST_SIGNAL"] = "SIGKILL@1:2:rank1"
    every = ["--checkpoint-every-min", "0.000001"]  # due at every meeting
    out = {}
    for name, restarts in (("killed", 1), ("dead", 0)):
        cmd = torchrun_cmd(args + every + ["--run-dir", str(root / name)], restarts)
        out[name] = subprocess.run(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=400,
            check=False,
        )
    dead = out["dead"]
    assert dead.returncode != 0 and "exitcode: -9" in dead.stdout, dead.stdout[-3000:]  # no restart
    mid = root / "dead" / "checkpoint.pt"
    return {
        "root": root,
        "straight": root / "straight",
        "killed": root / "killed",
        "args": args,
        "code": out["killed"].returncode,
        "out": out["killed"].stdout,
        "mid_path": mid,
        "mid": load(mid),
    }


def test_torchrun_restart_after_a_killed_worker_ends_with_the_unbroken_weights(killed):
    out = killed["out"]
    assert killed["code"] == 0, out[-3000:]
    # rank 1 died of the SIGKILL once; the restarted workers continued from step 1's checkpoint
    assert out.count("exitcode: -9") == 1 and out.count("resuming") == 1, out[-3000:]
    assert f"resuming {killed['killed']} at epoch 1 step 1\n" in out, out[-3000:]
    assert_same_state(
        load(killed["straight"] / "backbone.pt"), load(killed["killed"] / "backbone.pt")
    )
    assert_same_state(
        load(killed["straight"] / "checkpoint.pt"), load(killed["killed"] / "checkpoint.pt")
    )
    assert [m["epoch"] for m in read_metrics(killed["killed"])] == [1, 2]


def test_resume_on_another_number_of_processes_is_allowed_and_said(killed, tmp_path):
    mid = killed["mid"]
    assert mid["epoch"] == 0 and mid["at"]["step"] == 1 and mid["world"] == 2
    (tmp_path / "checkpoint.pt").write_bytes(killed["mid_path"].read_bytes())
    p = run_here(["simclr.py"] + killed["args"] + ["--run-dir", str(tmp_path)], env=ONE)
    said = f"resuming {tmp_path} at epoch 1 step 1; it ran on 2 process(es), this run has 1"
    assert said + ": allowed" in p.stdout
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [1, 2] and (
        tmp_path / "backbone.pt"
    ).exists()
    # once more, as a restarted worker would: the run is done
    again = run_here(["simclr.py"] + killed["args"] + ["--run-dir", str(tmp_path)], env=ONE)
    assert f"{tmp_path} has finished its 2 epochs: nothing to do." in again.stdout
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [1, 2]


def test_resume_with_a_flag_that_changes_the_run_is_one_sentence_and_exit_2(killed):
    p = run_here(
        ["simclr.py"]
        + killed["args"]
        + ["--epochs", "3", "--seed", "1", "--workers", "1", "--run-dir", str(killed["straight"])],
        env=ONE,
        check=False,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        f"error: the checkpoint '{killed['straight'] / 'checkpoint.pt'}' was run with "
        "--epochs 2 --seed 0, not --epochs 3 --seed 1; a resumed run keeps every flag that "
        "changes what it computes (pass the checkpoint's, or start another --run-dir)."
    ]  # --workers may change: it does not change what the run computes


# ------------------------------------------------------------------ unreadable images
@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """An image folder of 28 readable 16 px images, a truncated JPEG and a text file named .jpg;
    a README.txt beside them, which ImageFolder does not take for an image."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.RandomState(0)
    for split, n in (("train", 14), ("val", 4)):
        for c in ("a", "b"):
            os.makedirs(root / split / c)
            for i in range(n):
                Image.fromarray((rng.rand(16, 16, 3) * 255).astype(np.uint8)).save(
                    root / split / c / f"{i}.png"
                )
    Image.fromarray((rng.rand(16, 16, 3) * 255).astype(np.uint8)).save(
        root / "train" / "a" / "cut.jpg", quality=95
    )
    data = (root / "train" / "a" / "cut.jpg").read_bytes()
    (root / "train" / "a" / "cut.jpg").write_bytes(data[: len(data) // 2])
    (root / "train" / "b" / "page.jpg").write_text("<html>a saved error page, not an image</html>")
    (root / "train" / "README.txt").write_text("not part of the data set")
    return root


FOLDER = [
    "--dataset",
    "folder",
    "--image-size",
    "8",
    "--workers",
    "0",
    "--log-every",
    "1",
    "--epochs",
    "1",
    "--proj-hidden",
    "64",
    "--proj-dim",
    "32",
]


def test_check_data_names_the_bad_files_and_exits_2(faulty):
    p = run(
        ["simclr.py"] + FOLDER + ["--data-dir", str(faulty), "--batch-size", "30", "--check-data"],
        env=ONE,
        check=False,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("error: --check-data: 2 of 38 images cannot be read: ")
    assert (
        f"'{faulty / 'train' / 'a' / 'cut.jpg'}' (truncated file read)" in line.lower()
    )  # PIL's own words
    assert f"'{faulty / 'train' / 'b' / 'page.jpg'}' (cannot identify image file" in line


def test_without_check_data_training_replaces_and_counts_unreadable_images(faulty, tmp_path):
    """One step takes the whole train split (batch 30 of 30), so both bad files are drawn;
    eval_linear's feature pass over the same split replaces them too, and counts them in
    linear.json."""
    d = tmp_path / "run"
    p = run_here(
        ["simclr.py"]
        + FOLDER
        + [
            "--data-dir",
            str(faulty),
            "--batch-size",
            "30",
            "--knn-every",
            "0",
            "--run-dir",
            str(d),
        ],
        env=ONE,
    )
    assert "epoch 1/1  loss" in p.stdout and "Traceback" not in p.stderr
    (m,) = read_metrics(d)
    assert m["bad_images"] == 2
    e = run_here(["eval_linear.py", str(d), "--epochs", "2", "--workers", "0"], env=ONE)
    assert (
        json.load(open(d / "linear.json"))["bad_images"] == 2
    )  # the train split's two, in its feature pass
    assert "note: 2 unreadable images were replaced" in e.stdout


def test_tensor_path_names_an_unreadable_file_before_training(faulty, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ds = common.make_dataset("folder", str(faulty))
    with pytest.raises(common.UserError, match=r"cut\.jpg' cannot be read \(Truncated File Read\)"):
        common.decode_uint8(ds)
    # load_image: a bad item is replaced by the next readable one, the same one every time
    i = [p for p, _ in ds.samples].index(str(faulty / "train" / "a" / "cut.jpg"))
    img, y, j, replaced = common.load_image(ds, i)
    assert replaced and j == i + 1 and img.size == (16, 16) and common.load_image(ds, i)[2] == j
    assert common.load_image(ds, 0)[2:] == (0, False)


# ------------------------------------------------------------------ a full disk
@pytest.fixture
def in_process():
    """Main programs run in this process: one thread, as the subprocesses (ONE); and the stop
    signals that a script's __main__ catches are given back afterwards."""
    n, handlers, caught = (
        torch.get_num_threads(),
        {s: signal.getsignal(s) for s in common.STOP_SIGNALS},
        dict(common._caught),
    )
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    for s, h in handlers.items():
        signal.signal(s, h)
    common._caught.update(caught)


def test_full_disk_keeps_the_last_checkpoint_and_says_why(
    straight, tmp_path, monkeypatch, capsys, in_process
):
    """torch.save raises ENOSPC half-way through epoch 2's checkpoint (after the bytes it could
    write); simclr.py as __main__, in this process: one sentence, exit 74, epoch 1's checkpoint
    whole and no temporary file; then, the disk freed, the same command ends where the unbroken
    run does."""
    d = tmp_path / "run"
    real, saves = torch.save, []

    def full(obj, f, *a, **k):
        saves.append(getattr(f, "name", f))
        if len(saves) == 3:  # epoch 1: checkpoint.pt, backbone.pt; epoch 2: checkpoint.pt
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(sys, "argv", argv("simclr", "--run-dir", str(d)))
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(os.path.join(REPO, "simclr.py"), run_name="__main__")
    assert stop.value.code == common.EXIT_WRITE
    assert saves[2].endswith("checkpoint.pt.tmp")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: No space left on device while writing '{d / 'checkpoint.pt'}'; the last "
        "checkpoint there is whole (files are written to a temporary name, then renamed); free "
        "some space and run the same command with --resume on the run folder."
    ]
    assert load(d / "checkpoint.pt")["epoch"] == 1 and not (d / "checkpoint.pt.tmp").exists()
    assert [m["epoch"] for m in read_metrics(d)] == [
        1,
        2,
    ]  # epoch 2's line came before its checkpoint
    monkeypatch.setattr(torch, "save", real)
    # resume as a checkpoint of the epoch-granularity format (no position, no process count) would
    ckpt = load(d / "checkpoint.pt")
    del ckpt["at"], ckpt["world"]
    real(ckpt, d / "checkpoint.pt")
    import simclr

    assert simclr.main(simclr.parse_args(argv("simclr", "--run-dir", str(d))[1:])) == 0
    assert "resuming" in capsys.readouterr().out
    assert [m["epoch"] for m in read_metrics(d)] == [
        1,
        2,
    ]  # epoch 2's first line, from before the checkpoint, dropped
    assert_same_state(load(straight["simclr"] / "backbone.pt"), load(d / "backbone.pt"))


# ------------------------------------------------------------------ a loss that turns non-finite
def test_a_loss_non_finite_in_epoch_2_stops_and_keeps_epoch_1s_checkpoint(
    straight, tmp_path, monkeypatch, capsys, in_process
):
    """simclr.py as __main__, in this process, with SimCLR's loss made NaN at step 2 of epoch 2 (the
    5th call of F.cross_entropy, the loss's last call, once a step): a line naming that step, exit 1
    (README's exit-code table), checkpoint.pt and backbone.pt left as epoch 1 wrote them, and the
    same command, the loss sound again, resumes from them to the unbroken run's weights."""
    d = tmp_path / "run"
    real, calls, kept = torch.nn.functional.cross_entropy, [], {}

    def loss(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # epoch 2's first step: the files are epoch 1's end's
            kept.update({f: (d / f).read_bytes() for f in ("checkpoint.pt", "backbone.pt")})
        out = real(*a, **k)
        return out * float("nan") if len(calls) == 5 else out

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", loss)
    monkeypatch.setattr(sys, "argv", argv("simclr", "--run-dir", str(d)))
    with pytest.raises(SystemExit) as end:
        runpy.run_path(os.path.join(REPO, "simclr.py"), run_name="__main__")
    assert end.value.code == 1 and len(calls) == 5  # no step after the first non-finite one
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "error: the loss became non-finite at epoch 2, step 2; stopping, the last good checkpoint "
        f"stays in {d}."
    )
    assert {f: (d / f).read_bytes() for f in kept} == kept  # not rewritten: the same bytes
    files = ["args.json", "backbone.pt", "checkpoint.pt", "metrics.jsonl", "steps.jsonl"]
    assert sorted(p.name for p in d.iterdir()) == files  # no temporary file left
    ckpt = load(d / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and ckpt["at"] is None
    assert [m["epoch"] for m in read_metrics(d)] == [1]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real)
    import simclr

    assert simclr.main(simclr.parse_args(argv("simclr", "--run-dir", str(d))[1:])) == 0
    assert f"resuming {d} at the start of epoch 2" in capsys.readouterr().out
    assert_same_state(load(straight["simclr"] / "backbone.pt"), load(d / "backbone.pt"))


# ------------------------------------------------------------------ the pieces
def test_the_loader_restarts_at_any_step_with_the_same_batches():
    """CPU path (0 or 2 workers, positives included) and tensor path: the batches from step 2 of an
    epoch started there are those of the epoch from its start."""
    ds = torch.utils.data.Subset(common.make_dataset("digits", "x"), range(64))
    views = common.simclr_views(8)

    def batches(path, start, workers=0):
        lo = common.TrainLoader(
            ds,
            views,
            16,
            common.STATS["digits"],
            torch.device("cpu"),
            seed=3,
            workers=workers,
            data_path=path,
        )
        lo.set_clusters(np.arange(64) % 5, 1)
        lo.set_epoch(1, start_step=start)
        return list(lo)

    for path in ("cpu", "tensor"):
        full, tail = batches(path, 0), batches(path, 2, workers=2 if path == "cpu" else 0)
        assert len(full) == 4 and len(tail) == 2
        for (c1, i1, p1), (c2, i2, p2) in zip(full[2:], tail):
            assert (
                torch.equal(i1, i2)
                and torch.equal(p1, p2)
                and all(torch.equal(a, b) for a, b in zip(c1, c2))
            )


def _agree(rank, world):
    """Rank 1 alone gets a real SIGUSR1 after its 3rd step; rank 0's clock is due from its 5th.
    Both record what poll() answered after each step."""
    common.catch_stop_signals()
    control = common.RunControl(0.0001 if rank == 0 else 100)  # only process 0's clock counts
    time.sleep(0.01)
    answers = []
    for step in range(400):
        time.sleep(
            0.001 if rank == 0 else 0.01
        )  # rank 1 is slower: rank 0 waits for it at every meeting
        if rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        answers.append(control.poll())
        if answers[-1][0]:
            break
    return answers


def test_processes_agree_on_a_signal_that_only_one_of_them_caught():
    a, b = spawn(_agree)
    assert (
        a == b
    )  # the same answers at the same steps: neither waits in a collective the other skips
    assert a[-1][0] == "SIGUSR1" and len(a) < 400
    assert any(due for _, due in a)  # process 0's clock, though process 1's would never be due


def test_run_scaffolding_lives_once_in_the_harness():
    """Atomic saves, the stop and checkpoint decision and __main__'s exit codes are common's: no
    script keeps a copy of its own, and each runs through common.Run and common.main_of."""
    for s in SCRIPTS:
        mod = importlib.import_module(s)
        for name in ("save_atomic", "check_finite", "lr_at"):
            assert not hasattr(mod, name), f"{s}.py has a {name} of its own"
        text = open(os.path.join(REPO, f"{s}.py")).read()
        assert "common.Run(args, METHOD" in text and "run.step_done(" in text, f"{s}.py"
        assert 'if __name__ == "__main__":\n    common.main_of(main, parse_args)' in text, f"{s}.py"
