"""Every default is a published recipe: RECIPES.md's tables against the scripts.

For each section `## SCRIPT.py [EXTRA ARGS]` of RECIPES.md, each row's "CleanSSL CIFAR" value
must be what `parse_args(EXTRA)` gives, and its "CleanSSL ImageNet" value what the
docstring's ImageNet command (the one with `--dataset folder` and EXTRA) gives; a row whose
source value differs from CleanSSL's must say why; and every hyperparameter flag of the
script has a row. So a default cannot drift from its recipe silently."""

import ast
import importlib
import math
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.environ.get("RECIPES_FILE", os.path.join(ROOT, "RECIPES.md"))
SECTIONS = [
    "simclr.py",
    "moco.py --moco-version 2",
    "moco.py --moco-version 3",
    "byol.py",
    "simsiam.py",
    "swav.py",
    "dino.py",
]
# Flags that are not part of a training recipe: where the data is, where the run goes, how it
# is evaluated and logged, the machine, and the add-ons (their defaults come from their papers,
# README's flag table and the add-ons block).
NOT_RECIPE = {
    "help",
    "dataset",
    "data_dir",
    "image_size",
    "seed",
    "device",
    "workers",
    "data_path",
    "compile",
    "run_dir",
    "resume",
    "steps_per_epoch",
    "knn_every",
    "knn_limit",
    "log_every",
    "log_seconds",
    "moco_version",
    "precision",
    "checkpoint_every_min",
    "check_data",
}
NOT_RECIPE_PREFIX = ("qscore_", "xattn")


def sections():
    text = open(RECIPES).read()
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    out = {}
    for part in parts:
        head, *lines = part.splitlines()
        rows = []
        for line in lines:
            cells = [
                c.strip().replace("\\|", "|")
                for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))
            ]
            if line.startswith("|") and cells[0].startswith("`--"):
                rows.append(cells)
        out[head.strip()] = rows
    return out


def literal(cell):
    cell = cell.strip().strip("`")
    try:
        return ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        return cell  # a bare word such as clip or resnet18


def same(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def imagenet_argv(module, script, extra):
    """The docstring's ImageNet command: the one with --dataset folder and the section's extra
    args."""
    doc = re.sub(r"\\\n\s*", " ", module.__doc__)
    found = []
    for line in doc.splitlines():
        if "--dataset folder" not in line or script not in line:
            continue
        tokens = shlex.split(line.split("#")[0])
        argv = tokens[[i for i, t in enumerate(tokens) if t.endswith(script)][0] + 1 :]
        if all(e in argv for e in extra):
            found.append(argv)
    assert len(found) == 1, (
        f"{script} {' '.join(extra)}: expected one ImageNet command in the docstring, "
        f"found {len(found)}"
    )
    return found[0]


def test_every_script_has_its_section():
    missing = [s for s in SECTIONS if s not in sections()]
    if RECIPES.endswith("RECIPES.md"):
        assert not missing, f"RECIPES.md has no section for {missing}"


@pytest.mark.parametrize("section", SECTIONS)
def test_defaults_and_imagenet_command_are_the_table(section):
    table = sections()
    if section not in table:
        pytest.skip(f"{section} not in {RECIPES}")
    script, *extra = section.split()
    module = importlib.import_module(script[:-3])
    cifar = vars(module.parse_args(extra))
    imagenet = vars(module.parse_args(imagenet_argv(module, script, extra)))
    seen = set()
    for cells in table[section]:
        assert len(cells) == 6, f"{section}: a row needs 6 cells: {cells}"
        flag, ours_c, theirs_c, ours_i, theirs_i, why = cells
        dest = flag.strip("`").split()[0].lstrip("-").replace("-", "_")
        assert dest in cifar, f"{section}: {flag} is not a flag of {script}"
        seen.add(dest)
        assert same(cifar[dest], literal(ours_c)), (
            f"{section} {flag}: default {cifar[dest]!r}, table {ours_c}"
        )
        assert same(imagenet[dest], literal(ours_i)), (
            f"{section} {flag}: ImageNet command {imagenet[dest]!r}, table {ours_i}"
        )
        for ours, theirs in ((ours_c, theirs_c), (ours_i, theirs_i)):
            if ours.strip("` ") != theirs.strip("` "):
                assert why, f"{section} {flag}: CleanSSL {ours} vs source {theirs} needs a reason"
    recipe_flags = {d for d in cifar if d not in NOT_RECIPE and not d.startswith(NOT_RECIPE_PREFIX)}
    assert recipe_flags <= seen, (
        f"{section}: flags without a row in the recipe table: {sorted(recipe_flags - seen)}"
    )
