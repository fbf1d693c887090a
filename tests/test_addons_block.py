"""The add-ons block is the same text in every method script (cleanRL-style duplication,
so that one copied script stands alone); this fails as soon as two copies drift, or as soon as
a script defines one of the block's names again outside it (the later definition would win)."""

import ast
import importlib
import inspect
import os
import re

from conftest import REPO

SCRIPTS = ["simclr.py", "moco.py", "byol.py", "simsiam.py", "swav.py", "dino.py"]


def block(path):
    text = open(path).read()
    m = re.search(r"^# --- add-ons.*?^# --- end add-ons\n", text, re.S | re.M)
    assert m, f"{path} has no '# --- add-ons' ... '# --- end add-ons' block"
    return m.group(0)


def test_add_ons_block_is_identical_everywhere():
    present = [s for s in SCRIPTS if os.path.exists(os.path.join(REPO, s))]
    assert "simclr.py" in present
    ref = block(os.path.join(REPO, "simclr.py"))
    for s in present:
        assert block(os.path.join(REPO, s)) == ref, (
            f"the add-ons block of {s} differs from simclr.py's"
        )


def test_public_names_exist_in_every_script():
    import importlib

    for s in SCRIPTS:
        if not os.path.exists(os.path.join(REPO, s)):
            continue
        mod = importlib.import_module(s[:-3])  # importing a script must run nothing
        for name in (
            "parse_args",
            "main",
            "qscore",
            "qscore_regularizer",
            "correlation_mask",
            "CrossAttentionHead",
        ):
            assert hasattr(mod, name), f"{s} lacks {name}"


def test_no_script_redefines_a_name_of_the_block():
    """Every function and class the block defines is defined once in each script, inside the
    block; the module's object is the block's own (its source is the block's text)."""
    ref = block(os.path.join(REPO, "simclr.py"))
    names = [n.name for n in ast.parse(ref).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert {"qscore", "qscore_regularizer", "correlation_mask", "CrossAttentionHead"} <= set(names)
    for s in SCRIPTS:
        text = open(os.path.join(REPO, s)).read()
        tree = ast.parse(text)
        defined = [
            n.name
            for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.col_offset == 0
        ]
        assigned = [
            t.id
            for n in tree.body
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        ]
        mod = importlib.import_module(s[:-3])
        for name in names:
            assert defined.count(name) == 1 and name not in assigned, f"{s} defines {name} again"
            assert inspect.getsource(getattr(mod, name)) in ref, f"{s}'s {name} is not the block's"
