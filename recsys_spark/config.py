"""Typed configuration: one place for every default, loaded from conf/*.yaml, overridable from the CLI.

Every section rejects unknown keys, so a typo in a YAML file or a ``--set`` override stops the run with
the offending key named instead of being ignored.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from recsys_spark.errors import ConfigError

SplitName = Literal["leave_last_out", "temporal"]
EVENT_TYPES = ("view", "fav", "cart", "purchase", "rating", "remove")
# The error type of a removed key; its ``ctx["key"]`` completes the location (see ``_format_errors``).
REMOVED_KEY = "removed_key"


class Section(BaseModel):
    """A block of configuration: unknown keys are errors, values are immutable.

    ``removed_keys`` maps a key the section no longer takes to where its setting went, so an old
    configuration stops with that pointer instead of a bare "extra inputs are not permitted". A validator
    can only report the section's location, so the error carries the key in its context and
    ``_format_errors`` appends it: the message names ``...net.lr``, not just ``...net``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    removed_keys: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _no_removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, instead in cls.removed_keys.items():
                if key in data:
                    raise PydanticCustomError(REMOVED_KEY, "no longer read: {instead}",
                                              {"key": key, "instead": instead})
        return data


class GenerateConfig(Section):
    """Synthetic e-commerce log: sizes, funnel rates and time span."""

    events: int = Field(200_000, gt=0, description="approximate number of events")
    users: int | None = Field(None, gt=0, description="default: events / 40")
    items: int | None = Field(None, gt=0, description="default: events / 100, at least 200")
    categories: int = Field(30, gt=0)
    days: int = Field(30, gt=0)
    start_date: dt.date = dt.date(2024, 1, 1)
    seed: int = 42
    zipf_exponent: float = Field(1.1, gt=0, description="item popularity within a category")
    taste_strength: float = Field(0.85, ge=0, le=1, description="share of views in favourite categories")
    cart_rate: float = Field(0.08, ge=0, le=1)
    purchase_rate: float = Field(0.35, ge=0, le=1, description="share of carts bought")
    repeat_purchase_rate: float = Field(0.05, ge=0, le=1)


class IngestConfig(Section):
    """Validity window for event times; rows outside go to quarantine as absurd timestamps."""

    min_event_time: dt.datetime = dt.datetime(1990, 1, 1)
    max_future_days: int = Field(1, ge=0, description="events later than now + this are rejected")


class InteractionsConfig(Section):
    # Defaults justified on the Taobao sample (docs/DATA.md): a purchase is the strongest signal,
    # a view the weakest; ratings count as one interaction each (implicit feedback).
    event_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "view": 1.0, "fav": 3.0, "cart": 4.0, "purchase": 5.0, "rating": 1.0, "remove": 0.0
        }
    )
    half_life_days: float | None = Field(None, gt=0, description="exponential time decay; none = off")
    min_user_interactions: int = Field(2, ge=1, description="distinct items per user, iterated")
    min_item_interactions: int = Field(2, ge=1, description="distinct users per item, iterated")
    max_filter_rounds: int = Field(20, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1, description="temporal split: share of events after cut")
    max_sequence_length: int = Field(50, ge=2)
    session_gap_minutes: float = Field(30.0, gt=0)

    @field_validator("event_weights")
    @classmethod
    def _known_types(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(weights) - set(EVENT_TYPES))
        if unknown:
            raise ValueError(f"unknown event types {unknown}; known: {list(EVENT_TYPES)}")
        if any(w < 0 for w in weights.values()):
            raise ValueError("event weights must be >= 0")
        return weights


class RecommendConfig(Section):
    k: int = Field(100, gt=0, description="recommendations per user written to gold/recommendations")
    users_per_block: int = Field(2048, gt=0, description="users scored by one matrix product or forward pass "
                                                         "(lowered so a block's scores stay under 128 MB)")


class EvaluateConfig(Section):
    ks: list[int] = Field(default_factory=lambda: [10, 20, 100])
    sessions: bool = Field(False, description="also score session models next-item on the temporal test "
                                              "period's sessions (gold/metrics rows with split 'sessions')")

    @field_validator("ks")
    @classmethod
    def _positive(cls, ks: list[int]) -> list[int]:
        if not ks or any(k <= 0 for k in ks):
            raise ValueError("ks must be a non-empty list of positive integers")
        return sorted(set(ks))


class FeaturesConfig(Section):
    """Side files for the user and item features (``recsys-spark features``; the feature models read the tables).

    ``format``: ``movielens`` reads MovieLens-100K's ``u.user`` / ``u.item``; ``none`` builds the features
    from the events alone (naming a file then is an error).
    """

    users_file: str | None = None
    items_file: str | None = None
    format: Literal["movielens", "none"] = "movielens"


class TrackingConfig(Section):
    """MLflow experiment tracking (recsys_spark.tracking)."""

    enabled: bool | None = Field(None, description="None: on when mlflow is installed; true: required; false: off")
    uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else a file store at <warehouse>/mlruns")
    experiment: str | None = Field(None, description="default: $MLFLOW_EXPERIMENT_NAME, else recsys-spark")


class MaintenanceConfig(Section):
    """`recsys-spark maintain`: Delta OPTIMIZE and VACUUM of the warehouse's tables."""

    vacuum_retention_hours: int = Field(
        168, ge=0,
        description="VACUUM deletes replaced files older than this; time travel (a backfill reading an older "
                    "version) reaches back this far. Delta itself refuses less than the table's "
                    "delta.deletedFileRetentionDuration (default 168 h) while its retention check is on")
    parallel_tables: int = Field(
        4, ge=1, description="tables compacted and vacuumed at once: each is a few short Spark jobs, which "
                             "leave most of a cluster idle one table at a time")


class PipelineConfig(Section):
    """The whole run. ``models`` maps a model name to its own hyper-parameters (conf/models/*.yaml)."""

    warehouse: str = "warehouse"
    split: SplitName = "leave_last_out"
    models: list[str] = Field(default_factory=lambda: ["popularity", "itemknn", "als"])
    generate: GenerateConfig = GenerateConfig()
    ingest: IngestConfig = IngestConfig()
    interactions: InteractionsConfig = InteractionsConfig()
    recommend: RecommendConfig = RecommendConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    features: FeaturesConfig = FeaturesConfig()
    tracking: TrackingConfig = TrackingConfig()
    maintenance: MaintenanceConfig = MaintenanceConfig()
    model_params: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("warehouse")
    @classmethod
    def _no_backtick(cls, warehouse: str) -> str:
        # Delta names a table by its path in backticks (delta.`<path>`, also inside its own
        # createIfNotExists), unescaped: a backtick would end the name and fail as a SQL syntax error.
        if "`" in warehouse:
            raise ValueError("a backtick cannot be in the warehouse path (Delta quotes table paths with it)")
        return warehouse


DEFAULT_CONFIG = Path("conf/pipeline.yaml")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message on one line: its text spans several (context, problem, a caret under the line)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (e.g. interactions.min_user_interactions=5), got {override!r}")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key.strip()}: the value is not valid YAML: {_yaml_problem(exc)}") from None


def _format_errors(exc: ValidationError, source: str, prefix: tuple[str, ...] = ()) -> str:
    """All of ``exc``'s errors on one line, each after the dotted key it concerns (``prefix`` + its location).

    One line because the CLI's last line of stderr is the error; the dotted key because that is what the
    user types in the YAML file or after ``--set``."""
    lines = []
    for err in exc.errors():
        loc = (*prefix, *err["loc"])
        if err["type"] == REMOVED_KEY:
            loc = (*loc, err["ctx"]["key"])
        where = ".".join(str(p) for p in loc)
        got = err.get("input")
        message = err["msg"].removeprefix("Value error, ")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append((f"{where}: " if where else "") + message + got_text)
    return " ".join(f"invalid configuration in {source}: {'; '.join(lines)}".split())


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load ``conf/pipeline.yaml`` (or ``path``) plus ``conf/models/<name>.yaml``, then ``--set`` overrides.

    Without a path, ``conf/pipeline.yaml`` in the working directory is used when it exists, and the
    built-in defaults otherwise.
    """
    data: dict[str, Any] = {}
    source = "built-in defaults"
    conf_path = Path(path) if path is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if conf_path is not None:
        data = _read_yaml(conf_path)
        source = str(conf_path)
        models_dir = conf_path.parent / "models"
        params = data.setdefault("model_params", {})
        if models_dir.is_dir() and isinstance(params, dict):  # anything else: the validation below says so
            for model_file in sorted(models_dir.glob("*.yaml")):
                params.setdefault(model_file.stem, _read_yaml(model_file))
    for override in overrides or []:
        _apply_override(data, override)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def model_config(config: PipelineConfig, name: str, schema: type[Section]) -> Section:
    """Validate the hyper-parameters of one model against its own schema; errors name the key from the
    top (``model_params.<name>.net.d``), as a ``--set`` would spell it.

    ``load_config`` cannot do this itself: the schemas live in the model modules, above this one.
    ``recsys_spark.models.registry.check_config`` calls this for every model right after loading."""
    try:
        return schema.model_validate(config.model_params.get(name, {}))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, f"model {name} (conf/models/{name}.yaml)",
                                         ("model_params", name))) from None
