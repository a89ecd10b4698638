"""Pydantic models of the providers' API answers, as documented in ``shared/api``.

Fields the engine relies on are required; the rest are optional so that a provider adding or
dropping a descriptive field does not stop a mirror. Unknown fields are ignored.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# --- Baseten: files (shared by training jobs and Loops) ------------------------------------------


class CheckpointFile(ApiModel):
    url: str
    relative_file_name: str
    node_rank: int
    size_bytes: int
    last_modified: str


class CheckpointFilesPage(ApiModel):
    """`GetTrainingJobCheckpointFilesResponseV1` and `LoopsCheckpointFilesResponseV1`."""

    presigned_urls: list[CheckpointFile]
    next_page_token: int | None = None
    total_count: int


# --- Baseten: training jobs ----------------------------------------------------------------------


class TrainingJob(ApiModel):
    id: str
    current_status: str | None = None
    name: str | None = None
    training_project_id: str | None = None


class TrainingJobCheckpoint(ApiModel):
    checkpoint_id: str
    created_at: datetime
    checkpoint_type: str | None = None
    base_model: str | None = None
    size_bytes: int = 0
    sync_status: str | None = None
    training_job_id: str | None = None


class TrainingJobCheckpoints(ApiModel):
    training_job: TrainingJob
    checkpoints: list[TrainingJobCheckpoint]


# --- Baseten: Loops ------------------------------------------------------------------------------


class LoopsTarget(StrEnum):
    TRAINER = "trainer"
    SAMPLER = "sampler"


class LoopsCheckpoint(ApiModel):
    id: str
    checkpoint_id: str
    run_id: str
    target: LoopsTarget
    created_at: datetime
    checkpoint_type: str | None = None
    base_model: str | None = None
    lora_adapter_config: dict[str, Any] | None = None
    size_bytes: int = 0
    sync_status: str | None = None


class LoopsCheckpoints(ApiModel):
    checkpoints: list[LoopsCheckpoint]


# --- W&B Training --------------------------------------------------------------------------------


class WandbCheckpoint(ApiModel):
    id: str
    step: int
    metrics: dict[str, float] = Field(default_factory=dict)


class WandbCheckpointPage(ApiModel):
    data: list[WandbCheckpoint]
    has_more: bool
    first_id: str = ""
    last_id: str = ""
