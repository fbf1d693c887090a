"""The end of a run (issue 33): a run that says it has finished has the final checkpoint's
backbone.pt, rewritten by the same command when a kill or a full disk left it missing or old; and
a real full disk is one sentence and exit 74 (EXIT_WRITE), with no temporary file left."""

import os
import shutil
import subprocess
import tempfile

import pytest
import torch

from conftest import TINY, run

ONE_EPOCH = TINY + ["--epochs", "1", "--knn-every", "0"]


def backbone_of(run_dir):
    """The backbone tensors of the run's checkpoint.pt, under backbone.pt's names."""
    ckpt = torch.load(
        os.path.join(run_dir, "checkpoint.pt"), map_location="cpu", weights_only=False
    )
    return {k[len("backbone.") :]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}


def assert_backbone_is_the_checkpoints(run_dir):
    want = backbone_of(run_dir)
    have = torch.load(os.path.join(run_dir, "backbone.pt"), map_location="cpu", weights_only=True)
    assert list(have) == list(want)
    assert all(torch.equal(have[k], v) for k, v in want.items())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch SimCLR run (its folder; each test works on a copy)."""
    d = tmp_path_factory.mktemp("finished") / "run"
    run(["simclr.py"] + ONE_EPOCH + ["--run-dir", str(d)])
    return d


def rerun(run_dir):
    """What the command says about the run, the line before the closing 'done: ...' block."""
    p = run(["simclr.py"] + ONE_EPOCH + ["--run-dir", str(run_dir)])
    lines = p.stdout.strip().splitlines()
    done = max(i for i, line in enumerate(lines) if line.startswith("done: "))
    return lines[done - 1]


def test_a_finished_run_without_backbone_pt_rewrites_it_from_its_checkpoint(finished, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    os.remove(d / "backbone.pt")
    line = rerun(d)
    assert "rewrote" in line and "backbone.pt" in line and "missing" in line, line
    assert_backbone_is_the_checkpoints(d)


def test_a_finished_run_with_another_backbone_pt_rewrites_it_from_its_checkpoint(
    finished, tmp_path
):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    other = {k: v + 1 if v.is_floating_point() else v for k, v in backbone_of(d).items()}
    torch.save(other, d / "backbone.pt")  # an older epoch's or another run's weights
    line = rerun(d)
    assert "rewrote" in line and "backbone.pt" in line, line
    assert_backbone_is_the_checkpoints(d)
    # and once it is the checkpoint's, the same command has nothing to do
    assert "nothing to do" in rerun(d)


def test_a_finished_run_with_its_backbone_pt_has_nothing_to_do(finished, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    for name in ("checkpoint.pt.tmp", "backbone.pt.tmp"):  # a crash's leftovers
        (d / name).write_bytes(b"\0" * 1000)
    line = rerun(d)
    assert line.endswith("has finished its 1 epochs: nothing to do."), line
    assert_backbone_is_the_checkpoints(d)
    assert not list(d.glob("*.tmp")), "a leftover .tmp file stayed"


@pytest.fixture
def tmpfs():
    """mount(size): a real tmpfs of that size (remounted if called again); unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full disk) needs root")
    where = tempfile.mkdtemp(prefix="cleanssl_tmpfs_")
    mounted = []

    def mount(size):
        opts = f"remount,size={size}" if mounted else f"size={size}"
        p = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", where], capture_output=True, text=True
        )
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (a real full disk): {p.stderr.strip()}")
        mounted.append(size)
        return where

    try:
        yield mount
    finally:
        if mounted:
            subprocess.run(["umount", where], check=False)
        os.rmdir(where)


def assert_full_disk(p, run_dir):
    err = p.stderr.strip()
    assert p.returncode == 74, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{err[-3000:]}"
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "No space left on device" in err and "checkpoint" in err, err
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")], os.listdir(run_dir)


def test_a_full_disk_at_the_checkpoint_is_exit_74_and_one_sentence(tmpfs):
    # 3 MB: room for args.json and metrics.jsonl, not for the ~7 MB checkpoint
    d = os.path.join(tmpfs("3M"), "run")
    p = run(["simclr.py"] + ONE_EPOCH + ["--run-dir", d], check=False)
    assert_full_disk(p, d)
    assert "checkpoint.pt'" in p.stderr
    assert not os.path.exists(os.path.join(d, "checkpoint.pt"))


def test_a_full_disk_at_the_backbone_then_room_ends_with_the_checkpoints_backbone(tmpfs):
    # 7 MB: room for the ~6.8 MB checkpoint, not for the ~0.75 MB backbone.pt after it
    d = os.path.join(tmpfs("7M"), "run")
    p = run(["simclr.py"] + ONE_EPOCH + ["--run-dir", d], check=False)
    assert_full_disk(p, d)
    assert "backbone.pt'" in p.stderr
    assert os.path.exists(os.path.join(d, "checkpoint.pt"))
    assert not os.path.exists(os.path.join(d, "backbone.pt"))
    tmpfs("16M")  # some space freed: the same command ends the run
    line = rerun(d)
    assert "rewrote" in line and "backbone.pt" in line, line
    assert_backbone_is_the_checkpoints(d)
