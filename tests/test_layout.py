"""The layout's rules (docs/ARCHITECTURE.md), checked on the source: imports run downward only, the
networks need nothing but torch, a model module imports no other model, and the orchestration names no
model. Every import counts, including those deferred into functions."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from recsys_spark.models import registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "recsys_spark"

# Lowest first: a module may import from its own layer and the layers before it, never from a later one.
LAYERS = [
    {"errors", "config", "tables", "metrics", "session", "runlock"},
    {"data", "nn"},
    {"train", "evaluate", "scoring"},
    {"models"},
    {"recommend", "tracking", "report", "pipeline"},
    {"cli", "doctor", "__main__"},
]
LAYER = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}
# Where the model names may not appear (the popularity model is the fallback every run serves with).
ORCHESTRATION = [PACKAGE / "pipeline.py", PACKAGE / "recommend.py", PACKAGE / "cli.py",
                 *sorted((ROOT / "scripts" / "airflow").glob("*.py"))]


def _unit(module: str) -> str:
    """recsys_spark.models.als -> models; recsys_spark.tables -> tables."""
    return module.split(".")[1]


def _imports(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, imported recsys_spark module) of every import in ``path`` (the module ``module``, by
    default its place in the repository), at any depth."""
    module = module or ".".join(path.relative_to(ROOT).with_suffix("").parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = ".".join([*module.split(".")[: -node.level], *([base] if base else [])])
            found += [(node.lineno, f"{base}.{alias.name}" if base == "recsys_spark" else base)
                      for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("recsys_spark.")]


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_module_has_a_layer():
    units = {_unit(".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in SOURCES}
    assert units <= set(LAYER), sorted(units - set(LAYER))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_downward(path):
    here = _unit(".".join(path.relative_to(ROOT).with_suffix("").parts))
    upward = [f"line {line}: {name} ({_unit(name)} is above {here})"
              for line, name in _imports(path) if LAYER[_unit(name)] > LAYER[here]]
    assert not upward, upward


def test_the_check_sees_deferred_and_relative_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from recsys_spark.models import registry\n    from ..scoring import top_k\n")
    found = [name for _, name in _imports(probe, "recsys_spark.data.probe")]
    assert found == ["recsys_spark.models", "recsys_spark.scoring"]
    assert [LAYER[_unit(name)] > LAYER["data"] for name in found] == [True, True]


@pytest.mark.parametrize("path", sorted((PACKAGE / "nn").glob("*.py")), ids=lambda p: p.name)
def test_networks_need_only_torch(path):
    # A network may build on a sibling network module (nn/fields.py, the field networks' base): still torch only.
    assert [name for _, name in _imports(path) if not name.startswith("recsys_spark.nn")] == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "models").glob("*.py")), ids=lambda p: p.name)
def test_a_model_module_imports_no_other_model(path):
    shared = {"recsys_spark.models.base", "recsys_spark.models.torch_base", "recsys_spark.models.sequence_base",
              "recsys_spark.models.field_base", "recsys_spark.models.registry"}
    others = [name for _, name in _imports(path) if name.startswith("recsys_spark.models") and name not in shared]
    assert not others, others


@pytest.mark.parametrize("path", ORCHESTRATION, ids=lambda p: p.name)
def test_the_orchestration_names_no_model(path):
    names = [m for m in registry.MODELS if m != "popularity"]
    pattern = re.compile(rf"\b({'|'.join(names)})\b", re.IGNORECASE)
    hits = [f"{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_registry_names_match_the_classes():
    for name in registry.MODELS:
        assert registry.model_class(name).name == name
    with pytest.raises(Exception, match="'sasrec_typo'.*choose from"):
        registry.model_class("sasrec_typo")
