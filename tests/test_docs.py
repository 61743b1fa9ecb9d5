"""The documentation: ICE's defaults as the signatures give them, links that resolve, the README's commands.

Fast and without mkdocs (CI runs ``mkdocs build --strict`` separately).

The docs state ICE's defaults in one recognisable form, with the bare class name (no
``losses.`` / ``reducers.`` prefix, which marks usage examples):

    ICELoss(scale=113.0)
    ICEReweightReducer(lam=1.53, normalize="batch")

and the reference pages carry the full signature, ``losses.ICELoss(scale=..., **kwargs)``.
Every such statement must quote the values of ``inspect.signature``, and a default value
written as ``scale=V`` / ``lam=V`` anywhere else in the docs must be inside one of them,
so changing a default in the library fails here until every page that states it is updated.
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
# Pages that must state the defaults (so that dropping the statement is noticed too).
STATING_DEFAULTS = [DOCS / "losses.md", DOCS / "reducers.md", DOCS / "tuning.md"]

INSTALL = 'python3 -m venv .venv && .venv/bin/pip install -e ".[bench,test]"'
MAIN_JOB = "python -m benchmarks.run"
TESTS = "python -m pytest -q"

BARE_CALL = re.compile(r"(?<![\w.])(ICELoss|ICEReweightReducer)\(([^()]*)\)")
SIGNATURE_LINE = re.compile(r"^[ \t]*((?:losses\.)?ICELoss|(?:reducers\.)?ICEReweightReducer)\((.*\*\*kwargs)\)[ \t]*$", re.M)
KEY_VALUE = re.compile(r"(?<![\w.])(scale|lam)=(-?\d+(?:\.\d+)?(?:e-?\d+)?)")


def signature_defaults():
    loss = inspect.signature(losses.ICELoss.__init__).parameters
    reducer = inspect.signature(reducers.ICEReweightReducer.__init__).parameters
    return {"scale": loss["scale"].default, "lam": reducer["lam"].default, "normalize": reducer["normalize"].default}


def rendered_signature(cls, defaults):
    """``(scale=113.0, memory_efficient=None, ...)`` without ``self``, with ``defaults`` put in, strings in double quotes."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    params = [p.replace(default=defaults[p.name]) if p.name in defaults else p for p in params]
    return "(" + ", ".join(map(str, params)).replace("'", '"') + ")"


def same_value(written, default):
    written = written.strip()
    if isinstance(default, str):
        return written in (f'"{default}"', f"'{default}'")
    try:
        return float(written) == float(default)
    except ValueError:
        return False


def default_mismatches(text, defaults):
    """(statement, problem) for every default statement in ``text`` that does not quote ``defaults``."""
    problems, covered = [], []
    for match in BARE_CALL.finditer(text):
        covered.append(match.span())
        for arg in filter(None, (a.strip() for a in match.group(2).split(","))):
            key, _, value = arg.partition("=")
            if key in defaults and not same_value(value, defaults[key]):
                problems.append((match.group(0), f"{key}={value}, but the default is {defaults[key]!r}"))
    for match in SIGNATURE_LINE.finditer(text):
        covered.append(match.span())
        cls = losses.ICELoss if match.group(1).endswith("ICELoss") else reducers.ICEReweightReducer
        expected = rendered_signature(cls, defaults)
        if "(" + match.group(2) + ")" != expected:
            problems.append((match.group(0).strip(), f"the signature is {cls.__name__}{expected}"))
    # The library's current values written as key=value must sit inside a statement above.
    real = signature_defaults()
    for match in KEY_VALUE.finditer(text):
        key, value = match.groups()
        if same_value(value, real[key]) and not any(a <= match.start() < b for a, b in covered):
            problems.append((match.group(0), "a default stated outside ICELoss(scale=...) / ICEReweightReducer(lam=..., ...)"))
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_defaults_the_docs_state_are_the_signatures(page):
    assert default_mismatches(page.read_text(), signature_defaults()) == []


@pytest.mark.parametrize("page", STATING_DEFAULTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_these_pages_state_the_defaults(page):
    text = page.read_text()
    stated = {m.group(1) for m in BARE_CALL.finditer(text)}
    stated |= {m.group(1).split(".")[-1] for m in SIGNATURE_LINE.finditer(text)}
    assert "ICELoss" in stated or page.name == "reducers.md", page
    assert "ICEReweightReducer" in stated, page


def test_a_changed_default_fails_until_the_docs_follow():
    real = signature_defaults()
    for key, other in (("scale", float(real["scale"]) + 1.0), ("lam", float(real["lam"]) + 0.5),
                       ("normalize", "anchor" if real["normalize"] == "batch" else "batch")):
        altered = dict(real, **{key: other})
        failing = [p.name for p in STATING_DEFAULTS if default_mismatches(p.read_text(), altered)]
        needed = [p.name for p in STATING_DEFAULTS if key != "scale" or p.name != "reducers.md"]
        assert failing == needed, key


def test_a_stale_default_is_caught():
    real = signature_defaults()
    assert default_mismatches("the default, `ICELoss(scale=1.0)`", real)
    assert default_mismatches('ICEReweightReducer(lam=0.25, normalize="batch")', real)
    assert default_mismatches(f"an unmarked default: scale={real['scale']}", real)
    assert not default_mismatches("usage: losses.ICELoss(scale=32), reducers.ICEReweightReducer(lam=2.0)", real)


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
    """docs/hooks/from_code.py writes what the code holds into the pages when mkdocs builds them."""
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        from_code = importlib.import_module("from_code")
    finally:
        sys.path.remove(str(DOCS / "hooks"))
    from benchmarks.core.loss_registry import LOSSES
    from benchmarks.data.registry import readme_table

    assert from_code.render("{{ dataset-table }}") == readme_table()
    spaces = from_code.render("{{ search-spaces }}")
    assert "| `ice` | " + "; ".join(p.describe() for p in LOSSES["ice"].search_space) + " |" in spaces
    assert from_code.render("{{ signature pml_ice.losses.ICELoss }}").splitlines()[1] == (
        "losses.ICELoss" + rendered_signature(losses.ICELoss, signature_defaults()))
    with pytest.raises(ValueError, match="unknown placeholder"):
        from_code.render("{{ no-such-fact }}")
    for page, name in ((DOCS / "datasets.md", "dataset-table"), (DOCS / "tuning.md", "search-spaces")):
        assert "{{ " + name + " }}" in page.read_text(), page
