"""The add-ons block is the same text in every method script (cleanRL-style duplication,
so that one copied script stands alone); this fails as soon as two copies drift."""
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
        assert block(os.path.join(REPO, s)) == ref, f"the add-ons block of {s} differs from simclr.py's"


def test_public_names_exist_in_every_script():
    import importlib
    for s in SCRIPTS:
        if not os.path.exists(os.path.join(REPO, s)):
            continue
        mod = importlib.import_module(s[:-3])  # importing a script must run nothing
        for name in ("parse_args", "main", "qscore", "qscore_regularizer", "correlation_mask", "CrossAttentionHead"):
            assert hasattr(mod, name), f"{s} lacks {name}"
