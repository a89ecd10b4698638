"""Pydantic models of the providers' API answers, as documented in ``shared/api``.

Only the fields the engine reads are modelled: those it relies on required, the others optional.
The pages' descriptive fields (a job's status, a checkpoint's type or base model, a LoRA config)
are not, so that a provider changing or dropping one does not stop a mirror: a Loops checkpoint
whose `lora_adapter_config` came as a string was unreadable, and not mirrored, for a field
nothing reads. Unknown fields are ignored. An entry of a
file listing (or of a checkpoint list: a Loops target the pages do not name, a W&B null step, a
checkpoint's size that is neither an integer nor null) that does not match its model is kept as
`Unreadable` rather than failing its page: that one file (or checkpoint) fails, and the rest of
the listing is mirrored.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, TypeVar, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    Strict,
    ValidationError,
    ValidatorFunctionWrapHandler,
)
from pydantic_core import CoreSchema, core_schema

T = TypeVar("T")


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# A time without a zone is taken as UTC: naive and aware times cannot be compared or ordered.
Moment = Annotated[datetime, AfterValidator(_as_utc)]


class _JsonInteger:
    """Marks an ``int`` read as the pages' JSON integer: a number with no fraction (``12``, or
    ``12.0``, which JSON Schema counts as one), not ``true`` nor ``"12"``, which pydantic's lax
    mode reads as 1 and 12 (a file of node rank 1 that is not). All in compiled code: an
    integer is taken at the first step; only a float goes on to the second."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        whole_float = core_schema.chain_schema(
            [core_schema.float_schema(strict=True), core_schema.int_schema()]
        )
        return core_schema.union_schema(
            [core_schema.int_schema(strict=True), whole_float],
            mode="left_to_right",
            custom_error_type="int_type",
        )


Integer = Annotated[int, _JsonInteger()]
# A JSON number: not ``true`` nor ``"0.5"``, which lax mode reads as 1.0 and 0.5.
Number = Annotated[float, Strict()]


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def describe(error: ValidationError, whole: str) -> str:
    """The first problem of a validation error, as ``where: what``; ``whole`` names the root."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or whole
    return f"{where}: {first['msg']}"


class Unreadable:
    """A list entry that does not match its model, and why."""

    def __init__(self, entry: object, reason: str) -> None:
        self.entry = entry
        self.reason = reason

    def get(self, key: str, kind: type[T]) -> T | None:
        """A field of the entry, to name it by in a report; None if it has none of that type."""
        value = self.entry.get(key) if isinstance(self.entry, dict) else None
        return value if isinstance(value, kind) else None

    def moment(self, key: str) -> datetime | None:
        """A time of the entry (ISO 8601), one without a zone taken as UTC as `Moment` takes it;
        None if it has none readable."""
        text = self.get(key, str)
        try:
            return _as_utc(datetime.fromisoformat(text)) if text else None
        except ValueError:
            return None


class _OrUnreadable:
    """Marks ``Model | Unreadable``, or a ``list`` of them: an entry the model refuses becomes
    `Unreadable`.

    A list is first read as ``list[Model]``, all in pydantic's compiled code; only a list with
    an entry it refuses is read again entry by entry, each through `_keep_unreadable`. That
    Python call per entry was half the cost of reading a page of files (2.1 -> 1.06 us an
    entry). A value that is no list fails both ways, with the one error a list would give.
    """

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        listed = get_origin(source) is list
        (entry,) = get_args(source) if listed else (source,)
        (model,) = (arg for arg in get_args(entry) if arg is not Unreadable)
        model_schema = handler.generate_schema(model)
        entry_or_unreadable = core_schema.no_info_wrap_validator_function(
            _keep_unreadable, model_schema
        )
        if not listed:
            return entry_or_unreadable
        return core_schema.union_schema(
            [core_schema.list_schema(model_schema), core_schema.list_schema(entry_or_unreadable)],
            mode="left_to_right",
            custom_error_type="list_type",
        )


def _keep_unreadable(entry: Any, validate: ValidatorFunctionWrapHandler) -> Any:
    try:
        return validate(entry)
    except ValidationError as exc:
        return Unreadable(entry, describe(exc, "entry"))


OR_UNREADABLE = _OrUnreadable()


# --- Baseten: files (shared by training jobs and Loops) ------------------------------------------


class CheckpointFile(ApiModel):
    url: str
    relative_file_name: str
    node_rank: Integer
    size_bytes: Integer
    last_modified: str


class CheckpointFilesPage(ApiModel):
    """`GetTrainingJobCheckpointFilesResponseV1` and `LoopsCheckpointFilesResponseV1`."""

    presigned_urls: Annotated[list[CheckpointFile | Unreadable], OR_UNREADABLE]
    next_page_token: Integer | None = None
    total_count: Integer


# --- Baseten: training jobs ----------------------------------------------------------------------


class TrainingJobCheckpoint(ApiModel):
    checkpoint_id: str
    created_at: Moment
    size_bytes: Integer | None = None  # null or absent: not told (`list` shows "-"), not 0 B
    sync_status: str | None = None


class TrainingJobCheckpoints(ApiModel):
    # An entry off the schema fails alone, not the job's listing, as in Loops and W&B.
    checkpoints: Annotated[list[TrainingJobCheckpoint | Unreadable], OR_UNREADABLE]


# --- Baseten: Loops ------------------------------------------------------------------------------


class LoopsTarget(StrEnum):
    TRAINER = "trainer"
    SAMPLER = "sampler"


class LoopsCheckpoint(ApiModel):
    id: str
    checkpoint_id: str
    run_id: str
    target: LoopsTarget
    created_at: Moment
    size_bytes: Integer | None = None  # null or absent: not told (`list` shows "-"), not 0 B
    sync_status: str | None = None


class LoopsCheckpoints(ApiModel):
    checkpoints: Annotated[list[LoopsCheckpoint | Unreadable], OR_UNREADABLE]


# --- W&B Training --------------------------------------------------------------------------------


def _logged(metrics: Any) -> Any:
    """A checkpoint's metrics without those sent as null: W&B nulls a metric not logged at that
    step, though its OpenAPI page admits numbers only. Absent, it takes no part in ``--best``.
    A null map is none logged, as a missing one is."""
    if metrics is None:
        return {}
    if isinstance(metrics, dict):
        return {name: value for name, value in metrics.items() if value is not None}
    return metrics


class WandbCheckpoint(ApiModel):
    id: str
    step: Integer
    metrics: Annotated[dict[str, Number], BeforeValidator(_logged)] = Field(default_factory=dict)


class WandbCheckpointPage(ApiModel):
    # An entry off the schema (a null step, say) fails alone, not its page: the listing goes on.
    data: Annotated[list[WandbCheckpoint | Unreadable], OR_UNREADABLE]
    has_more: bool
    last_id: str = ""
