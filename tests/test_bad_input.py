"""Bad input (issue 33, items 3 and 4): a bad number or run folder, an unknown backbone, a corrupt
checkpoint.pt or backbone.pt get one sentence and exit 2 before any work, never a traceback. Most
cases call the checks in this process (common.check_run, common.build_backbone); a few run the
scripts for the exit code and the single line."""

import importlib
import json
import os
import stat

import numpy as np
import pytest
import torch

import common
import eval_linear
from conftest import BACKBONE, TINY, run

SCRIPTS = ["simclr", "moco", "byol", "simsiam", "swav", "dino"]

# flags that must be refused, each alone on top of TINY
BAD_NUMBERS = [
    ["--batch-size", "0"],
    ["--batch-size", "-16"],
    ["--steps-per-epoch", "-1"],
    ["--image-size", "-5"],
    ["--workers", "-1"],
    ["--epochs", "0"],
    ["--lr", "-0.4"],
    ["--lr", "0"],
    ["--lr", "nan"],
    ["--lr", "inf"],
    ["--warmup-epochs", "-1"],
    ["--checkpoint-every-min", "-1"],
    ["--knn-every", "-1"],
    ["--knn-limit", "-1"],
    ["--log-every", "0"],
    ["--log-every", "-1"],
]


def read_only_folder(tmp_path):
    """A folder this process cannot write in: permission bits, or for root (who ignores them)
    a folder of a read-only file system; None when there is none."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(stat.S_IRUSR | stat.S_IXUSR)
        return d
    for d in ("/sys", "/proc/sys"):
        try:
            open(os.path.join(d, ".cleanssl-probe"), "w").close()
        except OSError:
            return d
    return None


def one_line_exit_2(p):
    """The process said one sentence on stderr and exited 2."""
    out = f"exit {p.returncode}\nstdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-2000:]}"
    assert p.returncode == 2, out
    assert "Traceback" not in p.stderr, out
    assert len(p.stderr.strip().splitlines()) == 1, out
    assert p.stderr.startswith("error: "), out
    return p.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_method_refuses_bad_numbers_before_any_work(script, tmp_path):
    """common.check_run, shared by the six scripts, refuses each bad number and run folder."""
    module = importlib.import_module(script)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    bad = BAD_NUMBERS + [
        ["--run-dir", str(a_file)],
        ["--run-dir", str(a_file / "run")],  # a parent that is a file
    ]
    ro = read_only_folder(tmp_path)
    if ro is not None:
        bad += [["--run-dir", str(ro)], ["--run-dir", os.path.join(ro, "new", "run")]]
    for flags in bad:
        argv = TINY + ["--run-dir", str(tmp_path / "run")] + flags
        args = module.parse_args(argv)
        with pytest.raises(common.UserError) as e:
            common.check_run(args, module.METHOD)
        msg = str(e.value)
        assert "\n" not in msg and flags[0] in msg, (flags, msg)
    assert not (tmp_path / "run").exists()  # nothing was made
    args = module.parse_args(TINY + ["--run-dir", str(tmp_path / "run")])
    assert common.check_run(args, module.METHOD) == (None, None)  # TINY itself is fine


@pytest.mark.parametrize(
    "flags",
    [["--batch-size", "0"], ["--run-dir-file"]],  # the rest: in-process, above
)
def test_bad_numbers_exit_2_with_one_line(flags, tmp_path):
    run_dir = tmp_path / "run"
    if flags == ["--run-dir-file"]:
        run_dir.write_text("not a folder")
        flags = []
    p = run(["simclr.py"] + TINY + flags + ["--run-dir", str(run_dir)], check=False)
    one_line_exit_2(p)
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "args.json").exists()


def test_read_only_run_dir_exits_2(tmp_path):
    ro = read_only_folder(tmp_path)
    if ro is None:
        pytest.skip("no folder here that this process cannot write in")
    run_dir = os.path.join(ro, "run")
    p = run(["simclr.py"] + TINY + ["--run-dir", run_dir], check=False)
    assert "cannot be written" in one_line_exit_2(p)


def test_unknown_backbone_is_one_line():
    p = run(["simclr.py", "--backbone", "resnet99"], check=False)
    err = one_line_exit_2(p)
    assert "resnet99" in err and "resnet18-eighth" in err
    assert p.stdout == ""  # no usage text either


def test_the_backbone_flag_still_takes_every_backbone():
    import simclr

    for name in common.BACKBONES:
        assert simclr.parse_args(["--backbone", name]).backbone == name
    assert simclr.parse_args([]).backbone == "resnet18"


# --- corrupt files ------------------------------------------------------------------------
def corrupt(path, kind, whole):
    """Write `whole` (the bytes of a good file) to `path` spoiled as `kind`."""
    data = {
        "truncated": whole[: len(whole) // 2],
        "zero-bytes": b"",
        # over the zip's first headers: torch.load checks no checksum of the tensors' bytes, so
        # random bytes inside a tensor go unnoticed
        "random-bytes": whole[:64] + os.urandom(4096) + whole[64 + 4096 :],
        "html": b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n",
    }[kind]
    with open(path, "wb") as fh:
        fh.write(data)


KINDS = ["truncated", "zero-bytes", "random-bytes", "html"]


def good_checkpoint(run_dir):
    """The bytes of a checkpoint.pt as a TINY SimCLR run writes it (its shape, not its training)."""
    import simclr

    args = simclr.parse_args(TINY + ["--run-dir", str(run_dir)])
    state = {"model": common.build_backbone(BACKBONE).state_dict()}
    obj = {"method": "simclr", "args": vars(args), "world": 1, "epoch": 1, "at": None, **state}
    path = run_dir / "good.pt"
    torch.save(obj, path)
    whole = path.read_bytes()
    path.unlink()
    return whole


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_checkpoint_is_one_sentence(kind, tmp_path):
    import simclr

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    corrupt(run_dir / "checkpoint.pt", kind, good_checkpoint(run_dir))
    for resume in ([], ["--resume", str(run_dir)]):  # auto-resume, and --resume
        args = simclr.parse_args(TINY + ["--run-dir", str(run_dir)] + resume)
        with pytest.raises(common.UserError) as e:
            common.check_run(args, "simclr")
        msg = str(e.value)
        assert str(run_dir / "checkpoint.pt") in msg and "delete it" in msg and "\n" not in msg


def test_corrupt_checkpoint_exits_2(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    corrupt(run_dir / "checkpoint.pt", "truncated", good_checkpoint(run_dir))
    p = run(["simclr.py"] + TINY + ["--run-dir", str(run_dir)], check=False)
    assert "checkpoint.pt" in one_line_exit_2(p)


def test_auto_resume_mismatch_does_not_blame_resume(tmp_path):
    """With a checkpoint in --run-dir and no --resume, the messages name the run folder's
    checkpoint, not --resume."""
    import moco
    import simclr

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(good_checkpoint(run_dir))
    cases = [
        (moco.parse_args(TINY + ["--run-dir", str(run_dir)]), "moco"),  # another method
        (simclr.parse_args(TINY[:-1] + ["resnet18-quarter", "--run-dir", str(run_dir)]), "simclr"),
    ]
    for args, method in cases:
        with pytest.raises(common.UserError) as e:
            common.check_run(args, method)
        assert not str(e.value).startswith("--resume") and "--run-dir" in str(e.value)
    args = simclr.parse_args(TINY + ["--resume", str(run_dir)])
    with pytest.raises(common.UserError, match="^--resume: "):
        common.check_run(args, "moco")


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_backbone_is_one_sentence(kind, tmp_path):
    """common.build_backbone (interpret.py's loader) and eval_linear.load_backbone."""
    path = tmp_path / "backbone.pt"
    torch.save(common.build_backbone(BACKBONE).state_dict(), path)
    corrupt(path, kind, path.read_bytes())
    with pytest.raises(common.UserError) as e:
        common.build_backbone(BACKBONE, True, str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    args = eval_linear.parse_args([str(tmp_path), "--backbone", BACKBONE, "--dataset", "digits"])
    args.weights = str(path)
    with pytest.raises(common.UserError) as e:
        eval_linear.load_backbone(args, 16)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def run_folder_with(tmp_path, kind):
    """A finished-looking run folder whose backbone.pt is spoiled as `kind`, with what
    interpret.py reads before the weights (args.json, predictions.npz)."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "args.json").write_text(json.dumps({"dataset": "digits", "backbone": BACKBONE}))
    np.savez(d / "predictions.npz", h=np.zeros((2, 64), np.float32), index=[0, 1], label=[0, 1])
    torch.save(common.build_backbone(BACKBONE).state_dict(), d / "backbone.pt")
    corrupt(d / "backbone.pt", kind, (d / "backbone.pt").read_bytes())
    return d


@pytest.mark.parametrize("kind", ["zero-bytes", "html"])
def test_eval_linear_and_interpret_exit_2_on_a_corrupt_backbone(kind, tmp_path):
    d = run_folder_with(tmp_path, kind)
    for script in ("eval_linear.py", "interpret.py"):
        p = run([script, str(d), "--device", "cpu"], check=False)
        assert "backbone.pt" in one_line_exit_2(p), script


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_from_before_a_flag_is_one_sentence(script, tmp_path):
    """A checkpoint written before a flag of this version existed (issue 34, point 5: one from
    before the add-on changes lacks --xattn-mask, --qscore-alpha-quantile...) is refused by name,
    not resumed under today's defaults."""
    mod = importlib.import_module(script)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = mod.parse_args(TINY + ["--run-dir", str(run_dir)])
    old = {k: v for k, v in vars(args).items() if k not in ("xattn_mask", "qscore_alpha_quantile")}
    torch.save({"method": script, "args": old, "epoch": 1, "at": None}, run_dir / "checkpoint.pt")
    with pytest.raises(common.UserError) as e:
        common.check_run(args, script)
    msg = str(e.value)
    assert "--xattn-mask" in msg and "--qscore-alpha-quantile" in msg and "\n" not in msg
    assert "written before" in msg


def test_an_xattn_checkpoint_without_centroids_is_one_sentence(tmp_path):
    """An --xattn checkpoint from before the k-means centroids were saved would re-seed k-means on
    resume (renumbered clusters under a trained classifier): exit 2, one line."""
    import simclr

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = simclr.parse_args(TINY + ["--xattn", "--run-dir", str(run_dir)])
    ckpt = {"method": "simclr", "args": vars(args), "epoch": 1, "at": None, "pseudo_labels": None}
    torch.save(ckpt, run_dir / "checkpoint.pt")
    with pytest.raises(common.UserError, match="holds no k-means centroids"):
        common.check_run(args, "simclr")
    p = run(["simclr.py"] + TINY + ["--xattn", "--run-dir", str(run_dir)], check=False)
    assert "centroids" in one_line_exit_2(p)
    torch.save({**ckpt, "centroids": None}, run_dir / "checkpoint.pt")  # saved, even if None
    assert common.check_run(args, "simclr")[0]["epoch"] == 1
