"""The documentation: facts the code holds are written into the pages from the code
(docs/hooks/from_code.py), links resolve, the README's commands.

Fast and without mkdocs (CI runs ``mkdocs build --strict`` separately). The pages state
ICE's defaults and signatures through the hook's placeholders (``{{ defaults }}``,
``{{ signature pml_ice.losses.ICELoss }}``), never as a copy, so a changed default needs no
page edited; a test here catches a copy written by hand.
"""

import importlib
import inspect
import re
import sys
import unicodedata
from pathlib import Path

import pytest

from pml_ice import losses, reducers

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, ROOT / "benchmarks" / "README.md", *sorted(DOCS.rglob("*.md"))]
RUN_RECORDS = DOCS / "evidence"  # summaries the harness wrote, copied as they are

INSTALL = 'python3 -m venv .venv && .venv/bin/pip install -e ".[bench,test]"'
MAIN_JOB = "python -m benchmarks.run"
TESTS = "python -m pytest -q"


def from_code():
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        return importlib.import_module("from_code")
    finally:
        sys.path.remove(str(DOCS / "hooks"))


def default_values():
    loss = inspect.signature(losses.ICELoss.__init__).parameters
    reducer = inspect.signature(reducers.ICEReweightReducer.__init__).parameters
    return {"scale": loss["scale"].default, "lam": reducer["lam"].default}


def restated_defaults(text, defaults):
    """``key=value`` pieces of ``text`` that write a default's value by hand; a loss spec such
    as ``ice:lam=2.42,scale=6.69`` names a tuned setting, not a default."""
    text = re.sub(r"\b[a-z]+:[^\s`|\"]+", "", text)
    found = []
    for key, value in defaults.items():
        for match in re.finditer(rf"(?<![\w.]){key}=(-?\d+(?:\.\d+)?(?:e-?\d+)?)", text):
            if float(match.group(1)) == float(value):
                found.append(match.group(0))
    return found


@pytest.mark.parametrize("page", [p for p in PAGES if p.parent != RUN_RECORDS], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_restates_a_default(page):
    assert restated_defaults(page.read_text(), default_values()) == []


def test_a_restated_default_is_caught():
    defaults = {"scale": 113.0, "lam": 1.53}
    assert restated_defaults("the default, `ICELoss(scale=113.0)`", defaults) == ["scale=113.0"]
    assert restated_defaults("ICEReweightReducer(lam=1.53)", defaults) == ["lam=1.53"]
    assert restated_defaults("usage: losses.ICELoss(scale=32), reducers.ICEReweightReducer(lam=2.0)", defaults) == []
    assert restated_defaults("tuned: `ice:lam=1.53,normalize='anchor',scale=113`", defaults) == []


def test_the_reference_pages_take_signatures_and_defaults_from_the_code():
    assert "{{ signature pml_ice.losses.ICELoss }}" in (DOCS / "losses.md").read_text()
    assert "{{ signature pml_ice.reducers.ICEReweightReducer }}" in (DOCS / "reducers.md").read_text()
    assert "{{ defaults }}" in (DOCS / "losses.md").read_text() and "{{ defaults }}" in (DOCS / "tuning.md").read_text()
    hook = from_code()
    signature = hook.render("{{ signature pml_ice.losses.ICELoss }}").splitlines()[1]
    parameters = list(inspect.signature(losses.ICELoss.__init__).parameters.values())[1:]
    assert signature == "losses.ICELoss(" + ", ".join(map(str, parameters)).replace("'", '"') + ")"
    values = default_values()
    assert hook.render("{{ defaults }}").startswith(f"`ICELoss(scale={values['scale']})` with "
                                                     f"`ICEReweightReducer(lam={values['lam']}, normalize=")


def _slug(heading):
    """Python-Markdown's toc slug (mkdocs), which GitHub's agrees with for these headings."""
    value = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def _without_code(text):
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(page):
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*?)\s*$", _without_code(page.read_text()), flags=re.M)}


def _links(page):
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", _without_code(page.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(target)
    assert broken == []


def test_readme_is_a_short_front_door_with_the_three_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 160
    for command in (INSTALL, MAIN_JOB, TESTS):
        assert command in lines, command


def test_the_pages_placeholders_are_written_from_the_code():
    """docs/hooks/from_code.py writes what the registries hold into the pages when mkdocs builds them."""
    hook = from_code()
    from benchmarks.core.loss_registry import LOSSES
    from benchmarks.data.registry import readme_table

    assert hook.render("{{ dataset-table }}") == readme_table()
    spaces = hook.render("{{ search-spaces }}")
    assert "| `ice` | " + "; ".join(p.describe() for p in LOSSES["ice"].search_space) + " |" in spaces
    with pytest.raises(ValueError, match="unknown placeholder"):
        hook.render("{{ no-such-fact }}")
    for page, name in ((DOCS / "datasets.md", "dataset-table"), (DOCS / "tuning.md", "search-spaces")):
        assert "{{ " + name + " }}" in page.read_text(), page
