"""An mkdocs hook: the parts of the pages that state what the code holds are generated from
the code when the site is built, so each fact has one home.

A page writes ``{{ name }}`` or ``{{ name argument }}`` (``signature`` on a line of its own: it
is a code block); ``REPLACEMENTS`` maps each name to the function that writes it.
"""

import importlib
import inspect
import re
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]


def harness_module(name: str):
    """A module of the harness (``benchmarks``), read from the repository: the harness is not
    installed, and mkdocs restores ``sys.path`` after loading a hook."""
    if str(REPOSITORY) not in sys.path:
        sys.path.insert(0, str(REPOSITORY))
    return importlib.import_module(name)


PLACEHOLDER = re.compile(r"\{\{ *([\w-]+)(?: +([\w.]+))? *\}\}")


def signature(path: str) -> str:
    """``losses.ICELoss(scale=..., ..., **kwargs)``: a class's constructor as a user writes it."""
    module_name, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    text = ", ".join(str(p) for p in parameters).replace("'", '"')
    return f"```python\n{module_name.rpartition('.')[2]}.{name}({text})\n```"


def defaults(_=None) -> str:
    """ICE's shipped defaults, as the signatures give them."""
    from pml_ice import losses, reducers

    scale = inspect.signature(losses.ICELoss.__init__).parameters["scale"].default
    reducer = inspect.signature(reducers.ICEReweightReducer.__init__).parameters
    return (f'`ICELoss(scale={scale})` with `ICEReweightReducer(lam={reducer["lam"].default}, '
            f'normalize="{reducer["normalize"].default}")`')


def dataset_table(_=None) -> str:
    return harness_module("benchmarks.data.registry").readme_table()


def search_spaces(_=None) -> str:
    """Every tunable loss of the harness's registry with its search space."""
    registry = harness_module("benchmarks.core.loss_registry")
    LOSSES, TUNABLE_LOSSES = registry.LOSSES, registry.TUNABLE_LOSSES

    lines = ["| loss | search space (main parameter first) |", "|---|---|"]
    for name in TUNABLE_LOSSES:
        lines.append(f"| `{name}` | " + "; ".join(p.describe() for p in LOSSES[name].search_space) + " |")
    return "\n".join(lines)


REPLACEMENTS = {"signature": signature, "defaults": defaults, "dataset-table": dataset_table,
                "search-spaces": search_spaces}


def render(markdown: str) -> str:
    def replace(match):
        name, argument = match.groups()
        if name not in REPLACEMENTS:
            raise ValueError(f"unknown placeholder {{{{ {name} }}}}; known: {', '.join(REPLACEMENTS)}")
        return REPLACEMENTS[name](argument)

    return PLACEHOLDER.sub(replace, markdown)


def on_page_markdown(markdown, **kwargs):
    return render(markdown)
