"""Every configuration key, broken three ways, stops the run with one line that names it.

The keys come from the schemas themselves (``PipelineConfig`` and each registered model's ``params_class``,
walked recursively), so a key added later is swept without touching this file. Each case writes a copy of
the real conf/ (pipeline.yaml and conf/models/*.yaml) with one value changed and loads it the way the CLI
does: ``load_config`` and then ``registry.check_config``. The three ways:

- a wrong type, derived from the annotation (a list where a string or a choice belongs, a word elsewhere);
- a value out of range, derived from the field's constraints (``gt``/``ge``/``lt``/``le``, ``Literal``
  choices) and, for container fields, the convention that list sizes and dict weights are positive
  (``evaluate.ks``, ``net.hidden``, ``interactions.event_weights``) and names must be known ones
  (``models``);
- an unknown key beside the others, in every section (and in every dict-typed field).

Pure Python: no Spark session is started here.
"""

from __future__ import annotations

import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types as at
import pytest
import yaml
from pydantic.fields import FieldInfo

from recsys_spark import cli
from recsys_spark.config import PipelineConfig, Section, load_config
from recsys_spark.errors import ConfigError
from recsys_spark.models import registry

CONF = Path(__file__).resolve().parents[1] / "conf"
UNKNOWN = "zz_unknown_key"
WORD = "zz_not_a_value"


# --- the keys, from the schemas -----------------------------------------------------------------


def _base(annotation: Any) -> Any:
    """``X`` of ``X | None`` (the only unions the schemas use)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Section)


def _walk(schema: type[Section], prefix: tuple[str, ...]):
    """(path, field) for every field of ``schema``, nested sections included (and then their fields)."""
    for name, field in schema.model_fields.items():
        path = (*prefix, name)
        yield path, field
        if _is_section(_base(field.annotation)):
            yield from _walk(_base(field.annotation), path)


def _roots() -> list[tuple[tuple[str, ...], type[Section]]]:
    """The pipeline's schema, and each registered model's under ``model_params.<name>``."""
    return [((), PipelineConfig),
            *[(("model_params", name), registry.model_class(name).params_class) for name in registry.MODELS]]


FIELDS = [(path, field) for prefix, schema in _roots() for path, field in _walk(schema, prefix)]
SECTIONS = [prefix for prefix, _ in _roots()] + [path for path, field in FIELDS
                                                  if _is_section(_base(field.annotation))]


# --- bad values, from the annotations and constraints -------------------------------------------


def _a_valid(annotation: Any) -> Any:
    """A value of the right type (for a dict field's unknown key)."""
    base = _base(annotation)
    return {int: 1, float: 1.0, str: "x", bool: True}.get(base, {})


def wrong_type(field: FieldInfo) -> Any:
    base = _base(field.annotation)
    if base is str or typing.get_origin(base) is Literal:
        return [1, 2]
    return WORD  # not a number, bool, date, list, dict or section


def out_of_range(field: FieldInfo) -> list[Any]:
    base = _base(field.annotation)
    values = []
    for bound in field.metadata:
        if isinstance(bound, at.Gt):
            values.append(bound.gt)
        elif isinstance(bound, at.Ge):
            values.append(bound.ge - 1)
        elif isinstance(bound, at.Lt):
            values.append(bound.lt)
        elif isinstance(bound, at.Le):
            values.append(bound.le + 1)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin is Literal:
        values.append("zz_not_a_choice")
    elif origin is list:
        values.append([0] if args[0] is int else ["zz_not_a_choice"])
    elif origin is dict and args[1] in (int, float):
        values.append({key: -1 for key in field.get_default(call_default_factory=True)})
    return values


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path)


CASES = [pytest.param(path, wrong_type(field), id=f"{_dotted(path)}-type") for path, field in FIELDS]
CASES += [pytest.param(path, value, id=f"{_dotted(path)}-range{i}")
          for path, field in FIELDS for i, value in enumerate(out_of_range(field))]
# (where the unknown key goes, its value, the key the message must name). A dict field's validator may
# name the field and list the unknown key apart (``interactions.event_weights: unknown event types [...]``).
UNKNOWN_CASES = [pytest.param((*section, UNKNOWN), 1, _dotted((*section, UNKNOWN)),
                              id=f"{_dotted(section) or 'top'}-unknown")
                 for section in SECTIONS]
UNKNOWN_CASES += [pytest.param((*path, UNKNOWN), _a_valid(typing.get_args(_base(field.annotation))[1]), _dotted(path),
                               id=f"{_dotted(path)}-unknown")
                  for path, field in FIELDS if typing.get_origin(_base(field.annotation)) is dict]


# --- loading a changed copy of conf/ ------------------------------------------------------------


def _real_conf() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    pipeline = yaml.safe_load((CONF / "pipeline.yaml").read_text()) or {}
    models = {p.stem: yaml.safe_load(p.read_text()) or {} for p in sorted((CONF / "models").glob("*.yaml"))}
    return pipeline, models


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _load_changed(tmp_path: Path, path: tuple[str, ...], value: Any):
    """Write conf/ with ``path`` set to ``value`` (in conf/models/<name>.yaml for a model's key), then
    load and check it as the CLI does."""
    pipeline, models = _real_conf()
    if path[0] == "model_params" and len(path) > 2:
        _set(models[path[1]], path[2:], value)
    else:
        _set(pipeline, path, value)
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    for name, params in models.items():
        (tmp_path / "models" / f"{name}.yaml").write_text(yaml.safe_dump(params))
    config = load_config(tmp_path / "pipeline.yaml")
    registry.check_config(config)
    return config


def _assert_names(message: str, key: str) -> None:
    assert "\n" not in message, message
    assert re.search(rf"(^|[\s(]){re.escape(key)}($|[\s:.'])", message), f"{key!r} not named in: {message}"


# --- the sweep ----------------------------------------------------------------------------------


def test_the_sweep_covers_every_key_of_the_yaml_files():
    """The walk reaches every key the committed YAML files set (and they load cleanly as they are)."""
    swept = {_dotted(path) for path, _ in FIELDS}
    pipeline, models = _real_conf()

    def keys(data: dict[str, Any], prefix: tuple[str, ...]):
        for key, value in data.items():
            path = (*prefix, str(key))
            yield _dotted(path)
            if isinstance(value, dict) and _dotted(path) not in ("interactions.event_weights", "model_params"):
                yield from keys(value, path)

    in_yaml = set(keys(pipeline, ())) | {k for name, p in models.items() for k in keys(p, ("model_params", name))}
    assert in_yaml - swept == set()
    assert set(models) <= set(registry.MODELS)
    registry.check_config(load_config(CONF / "pipeline.yaml"))


@pytest.mark.parametrize(("path", "value"), CASES)
def test_a_bad_value_names_its_key(tmp_path, path, value):
    with pytest.raises(ConfigError) as caught:
        _load_changed(tmp_path, path, value)
    _assert_names(str(caught.value), _dotted(path))


@pytest.mark.parametrize(("path", "value", "key"), UNKNOWN_CASES)
def test_an_unknown_key_is_named(tmp_path, path, value, key):
    with pytest.raises(ConfigError) as caught:
        _load_changed(tmp_path, path, value)
    _assert_names(str(caught.value), key)
    assert UNKNOWN in str(caught.value)


# --- what the sweep's rules do not reach ---------------------------------------------------------


@pytest.mark.parametrize(("path", "value", "key"), [
    (("model_params", "deepfm", "candidates"), "alss", "model_params.deepfm.candidates"),  # must be a model
    (("model_params", "gru4rec", "net", "lr"), 0.1, "model_params.gru4rec.net.lr"),  # removed: says where it went
    (("model_params", "ncf", "net", "mlp_layers"), [7, 4], "model_params.ncf.net.mlp_layers"),  # odd first
    (("model_params",), None, "model_params"),
    (("interactions",), None, "interactions"),
])
def test_values_outside_the_generic_rules(tmp_path, path, value, key):
    with pytest.raises(ConfigError) as caught:
        _load_changed(tmp_path, path, value)
    _assert_names(str(caught.value), key)


def test_broken_yaml_is_one_line(tmp_path):
    (tmp_path / "pipeline.yaml").write_text("interactions:\n  test_fraction: [0.2\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "pipeline.yaml")
    assert "\n" not in str(caught.value) and "line 3" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_config(CONF / "pipeline.yaml", ["interactions.test_fraction=[0.2"])
    message = str(caught.value)
    assert "\n" not in message and "interactions.test_fraction" in message


def test_the_cli_stops_on_a_bad_model_key_before_spark(monkeypatch, capsys):
    """conf/models' keys are checked right after loading: one line on stderr naming the key, exit 2, and
    no Spark session asked for."""

    def no_spark(app: str):
        raise AssertionError(f"a Spark session was requested ({app}) before the configuration was checked")

    monkeypatch.setattr(cli, "_spark", no_spark)
    capsys.readouterr()
    status = cli.main(["train", "--model", "als", "--config", str(CONF / "pipeline.yaml"),
                       "--set", "model_params.sasrec.net.max_len=1"])
    out, err = capsys.readouterr()
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("recsys-spark train: error:"), err
    _assert_names(lines[0], "model_params.sasrec.net.max_len")
    assert json.loads(out.strip().splitlines()[-1])["status"] == "failed"

