"""The API models: a list entry off the schema is kept as `Unreadable`; a page off it fails."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from checkpoint_sync.models import (
    CheckpointFilesPage,
    LoopsCheckpoints,
    TrainingJobCheckpoints,
    Unreadable,
    WandbCheckpointPage,
    describe,
)

FILE = {
    "url": "https://bucket.example/o?X-Amz-Signature=s",
    "relative_file_name": "checkpoint-1/model.bin",
    "node_rank": 0,
    "size_bytes": 3,
    "last_modified": "2026-11-22T10:00:00Z",
}
NOT_A_FILE = "entry: Input should be a valid dictionary or instance of CheckpointFile"


@pytest.mark.parametrize(
    ("entries", "read"),
    [
        ([FILE, FILE], ["file", "file"]),
        (
            [FILE, {**FILE, "size_bytes": "3 bytes"}, FILE],
            ["file", "size_bytes: Input should be a valid integer", "file"],
        ),
        ([FILE, 5], ["file", NOT_A_FILE]),
        ([None], [NOT_A_FILE]),
        ([{**FILE, "node_rank": None}], ["node_rank: Input should be a valid integer"]),
        ([{k: v for k, v in FILE.items() if k != "url"}], ["url: Field required"]),
        ([], []),
    ],
)
def test_each_entry_of_a_page_is_a_file_or_unreadable(
    entries: list[object], read: list[str]
) -> None:
    page = CheckpointFilesPage.model_validate_json(
        json.dumps({"presigned_urls": entries, "total_count": len(entries)})
    )
    assert [
        entry.reason if isinstance(entry, Unreadable) else "file" for entry in page.presigned_urls
    ] == read


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"presigned_urls": 5, "total_count": 1}, "presigned_urls: Input should be a valid array"),
        (
            {"presigned_urls": None, "total_count": 1},
            "presigned_urls: Input should be a valid array",
        ),
        (
            {"presigned_urls": {"0": FILE}, "total_count": 1},
            "presigned_urls: Input should be a valid array",
        ),
        ({"total_count": 1}, "presigned_urls: Field required"),
        ({"presigned_urls": [FILE]}, "total_count: Field required"),
        (
            {"presigned_urls": [], "total_count": True},
            "total_count: Input should be a valid integer",
        ),
        (
            {"presigned_urls": [], "total_count": 1, "next_page_token": "1000"},
            "next_page_token: Input should be a valid integer",
        ),
    ],
)
def test_a_page_off_the_schema_fails_with_its_first_problem(
    body: dict[str, object], problem: str
) -> None:
    with pytest.raises(ValidationError) as failed:
        CheckpointFilesPage.model_validate_json(json.dumps(body))
    assert describe(failed.value, "body") == problem


CHECKPOINT = {"checkpoint_id": "checkpoint-1", "created_at": "2026-11-22T10:00:00Z"}
LOOPS_CHECKPOINT = {**CHECKPOINT, "id": "lc-1", "run_id": "r", "target": "trainer"}


NOT_AN_INTEGER = "Input should be a valid integer"


@pytest.mark.parametrize(
    ("listed", "read"),
    [
        (12, 12),
        (12.0, 12),  # an integer to JSON Schema, which the pages' `type: integer` is
        (True, NOT_AN_INTEGER),  # lax mode read it as 1: a file of node rank 1 that is not
        (False, NOT_AN_INTEGER),
        ("12", NOT_AN_INTEGER),
        (12.5, NOT_AN_INTEGER),
    ],
)
def test_what_the_pages_call_an_integer_is_a_json_integer(listed: object, read: object) -> None:
    def named(entry: object, field: str) -> str:
        return (
            entry.reason if isinstance(entry, Unreadable) else f"{field}: {getattr(entry, field)}"
        )

    files = CheckpointFilesPage.model_validate_json(
        json.dumps(
            {
                "presigned_urls": [
                    {**FILE, "node_rank": listed},
                    {**FILE, "size_bytes": listed},
                    FILE,
                ],
                "total_count": 3,
            }
        )
    ).presigned_urls
    (training,) = TrainingJobCheckpoints.model_validate_json(
        json.dumps({"checkpoints": [{**CHECKPOINT, "size_bytes": listed}]})
    ).checkpoints
    (loops,) = LoopsCheckpoints.model_validate_json(
        json.dumps({"checkpoints": [{**LOOPS_CHECKPOINT, "size_bytes": listed}]})
    ).checkpoints
    (wandb,) = WandbCheckpointPage.model_validate_json(
        json.dumps({"data": [{"id": "c", "step": listed}], "has_more": False})
    ).data
    assert [
        named(files[0], "node_rank"),
        named(files[1], "size_bytes"),
        named(training, "size_bytes"),
        named(loops, "size_bytes"),
        named(wandb, "step"),
    ] == [f"{field}: {read}" for field in ("node_rank", *["size_bytes"] * 3, "step")]
    assert named(files[2], "node_rank") == "node_rank: 0"  # the rest of the page is read


@pytest.mark.parametrize(
    ("listed", "size"),
    [
        ({"size_bytes": 5}, 5),
        ({"size_bytes": None}, None),  # not needed to mirror it (its files' sizes are listed)
        ({}, None),  # unknown, not 0 B
        ({"size_bytes": "5 GB"}, "size_bytes: Input should be a valid integer"),
    ],
)
def test_a_checkpoints_size_not_told_is_unknown(listed: dict[str, object], size: object) -> None:
    training = TrainingJobCheckpoints.model_validate(
        {"training_job": {"id": "j"}, "checkpoints": [{**CHECKPOINT, **listed}]}
    )
    loops = LoopsCheckpoints.model_validate({"checkpoints": [{**LOOPS_CHECKPOINT, **listed}]})
    for (entry,) in (training.checkpoints, loops.checkpoints):
        read = entry.reason.split(",")[0] if isinstance(entry, Unreadable) else entry.size_bytes
        assert read == size


@pytest.mark.parametrize(
    "described",
    [
        {"checkpoint_type": 5},
        {"base_model": {"name": "Qwen"}},
        {"lora_adapter_config": "r=16"},  # the page says an object
        {"training_job_id": ["j"]},
        {"current_status": 3, "training_project_id": None},
    ],
)
def test_a_descriptive_field_of_another_type_does_not_stop_a_checkpoint(
    described: dict[str, object],
) -> None:
    # Nothing reads them: they were modelled, and such a checkpoint was unreadable (not mirrored).
    training = TrainingJobCheckpoints.model_validate(
        {"training_job": described, "checkpoints": [{**CHECKPOINT, **described}]}
    )
    loops = LoopsCheckpoints.model_validate({"checkpoints": [{**LOOPS_CHECKPOINT, **described}]})
    for (entry,) in (training.checkpoints, loops.checkpoints):
        assert not isinstance(entry, Unreadable)
        assert entry.checkpoint_id == "checkpoint-1"


def test_a_job_listing_without_its_job_is_read() -> None:
    # The page requires `training_job`; nothing reads it, and its absence loses nothing.
    listed = TrainingJobCheckpoints.model_validate({"checkpoints": [CHECKPOINT]})
    assert [getattr(c, "checkpoint_id", None) for c in listed.checkpoints] == ["checkpoint-1"]


@pytest.mark.parametrize(
    ("metrics", "read"),
    [
        ({"reward": 0.5, "loss": None}, {"reward": 0.5}),  # null: not logged at that step
        (None, {}),
        ({}, {}),
        ([0.5], "metrics: Input should be a valid dictionary"),
        ({"reward": True}, "metrics.reward: Input should be a valid number"),  # not 1.0
        (
            {"reward": "high"},
            "metrics.reward: Input should be a valid number",
        ),
    ],
)
def test_a_wandb_checkpoints_metrics_are_those_logged(metrics: object, read: object) -> None:
    page = WandbCheckpointPage.model_validate(
        {"data": [{"id": "c", "step": 1, "metrics": metrics}], "has_more": False}
    )
    (entry,) = page.data
    assert (entry.reason if isinstance(entry, Unreadable) else entry.metrics) == read
