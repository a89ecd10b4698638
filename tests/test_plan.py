"""Decision tables for `plan`: selection, skip rule, parts, resume."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from pydantic import TypeAdapter

from checkpoint_sync.errors import FileError, IntegrityError, NotFoundError, UsageError
from checkpoint_sync.models import Moment
from checkpoint_sync.plan import (
    FileFilter,
    Part,
    Recorded,
    Staged,
    Tally,
    check_files_listed,
    check_listed_size,
    check_listed_url,
    check_paths_matched,
    check_ranks_listed,
    is_current,
    is_newer,
    parts_to_fetch,
    reach_to_record,
    removed_upstream,
    select_checkpoints,
    split_parts,
    unlisted_parts_go,
    walked_whole,
)
from checkpoint_sync.sources.base import (
    AbsentCheckpoint,
    Available,
    Checkpoint,
    PageRef,
    RemoteFile,
    SyncState,
    UnreadableCheckpoint,
    whole_list,
)


def checkpoint(
    name: str, hour: int, state: SyncState = SyncState.COMPLETE, key: str | None = None
) -> Checkpoint:
    return Checkpoint(
        key=key or name,
        name=name,
        run="run",
        created_at=datetime(2026, 1, 1, hour, tzinfo=UTC),
        size_bytes=1,
        state=state,
    )


RUN = [
    checkpoint("c1", 1),
    checkpoint("c3", 3),
    checkpoint("c2", 2),
    checkpoint("c4", 4, SyncState.SYNCING),
    checkpoint("c0", 0, SyncState.UNKNOWN),
]


@pytest.mark.parametrize(
    ("names", "latest", "include_syncing", "selected", "syncing"),
    [
        ((), False, False, ["c1", "c3", "c2", "c0"], ["c4"]),
        ((), False, True, ["c1", "c3", "c2", "c4", "c0"], []),
        ((), True, False, ["c3"], ["c4"]),  # newest complete; the newer syncing one named
        ((), True, True, ["c4"], []),  # newest, complete or not
        (("c1", "c2"), True, False, ["c2"], []),
        (("c4", "c1"), False, False, ["c1"], ["c4"]),  # beside one taken: left out, named
        (("c4",), False, True, ["c4"], []),
        (("c1", "c1"), False, False, ["c1"], []),
        # No status reported (null) is taken only where none is reported complete.
        (("c0", "c4"), True, False, ["c0"], ["c4"]),
        (("c0", "c4"), True, True, ["c4"], []),
        (("c0", "c1"), True, False, ["c1"], []),
    ],
)
def test_select_checkpoints(
    names: tuple[str, ...],
    latest: bool,
    include_syncing: bool,
    selected: list[str],
    syncing: list[str],
) -> None:
    chosen = select_checkpoints(RUN, names=names, latest=latest, include_syncing=include_syncing)
    assert [c.name for c in chosen.checkpoints] == selected
    assert [c.name for c in chosen.syncing] == syncing


# Loops: a checkpoint's id is not its name; --checkpoint takes either (README).
BY_ID = [checkpoint("step-1", 1, key="id-1"), checkpoint("step-2", 2, key="id-2")]


@pytest.mark.parametrize(
    ("names", "selected"),
    [
        (("id-1",), ["step-1"]),
        (("step-2",), ["step-2"]),
        (("id-1", "step-2"), ["step-1", "step-2"]),
    ],
)
def test_a_checkpoint_is_named_by_its_id_or_its_name(
    names: tuple[str, ...], selected: list[str]
) -> None:
    chosen = select_checkpoints(BY_ID, names=names)
    assert [c.name for c in chosen.checkpoints] == selected


@pytest.mark.parametrize("include_syncing", [False, True])
def test_a_checkpoint_of_another_status_is_left_out_of_a_plain_sync_too(
    include_syncing: bool,
) -> None:
    # README: --latest never takes one FAILED (say); a plain sync must not mirror it as complete.
    failed = checkpoint("f", 5, SyncState.OTHER)
    chosen = select_checkpoints([*RUN, failed], include_syncing=include_syncing)
    assert failed not in chosen.checkpoints
    assert chosen.other_status == [failed]
    named = select_checkpoints([*RUN, failed], names=("f", "c1"), include_syncing=include_syncing)
    assert (named.checkpoints, named.other_status) == ([RUN[0]], [failed])
    # `list` shows every checkpoint, with its status, and restores none: its messages (a
    # --node-rank no file has) name no checkpoint as asked for.
    listed = select_checkpoints([*RUN, failed], every_status=True)
    assert (listed.checkpoints, listed.named) == ([*RUN, failed], ())


def test_latest_with_include_syncing_takes_a_newer_syncing_one_not_a_null_or_failed_one() -> None:
    # README: with --include-syncing, --latest takes the newest of those complete and those still
    # SYNCING; a null status still counts only where none is complete, another status never.
    run = [
        checkpoint("c1", 1),
        checkpoint("s", 2, SyncState.SYNCING),
        checkpoint("n", 3, SyncState.UNKNOWN),
        checkpoint("f", 4, SyncState.OTHER),
    ]
    assert select_checkpoints(run, latest=True, include_syncing=True).checkpoints == [run[1]]
    assert select_checkpoints(run[:1] + run[2:], latest=True, include_syncing=True).checkpoints == [
        run[0]
    ]


@pytest.mark.parametrize("include_syncing", [False, True])
def test_latest_names_a_newer_checkpoint_of_another_status_it_did_not_take(
    include_syncing: bool,
) -> None:
    # As it names a newer one still uploading: a restore should know the run has a newer
    # checkpoint, which no rerun will mirror.
    older_failed, newer_failed = (
        checkpoint("f2", 2, SyncState.OTHER),
        checkpoint("f9", 9, SyncState.OTHER),
    )
    chosen = select_checkpoints(
        [*RUN, older_failed, newer_failed], latest=True, include_syncing=include_syncing
    )
    assert [c.name for c in chosen.checkpoints] == ["c4" if include_syncing else "c3"]
    assert chosen.other_status == [newer_failed]


@pytest.mark.parametrize(
    "extra",
    [
        # No older one than the c3 it took, nor one as old: they are not newer.
        checkpoint("s2", 2, SyncState.SYNCING),
        checkpoint("s3", 3, SyncState.SYNCING),
        checkpoint("f3", 3, SyncState.OTHER),
    ],
)
def test_latest_names_no_checkpoint_that_is_not_newer_than_the_one_it_took(
    extra: Checkpoint,
) -> None:
    chosen = select_checkpoints([*RUN, extra], latest=True)
    assert [c.name for c in chosen.checkpoints] == ["c3"]
    assert ([c.name for c in chosen.syncing], chosen.other_status) == (["c4"], [])


UNREADABLE = UnreadableCheckpoint(
    "u-id",
    "run/u (target reward_model, id u-id)",
    "target: ...",
    names=("u", "kind-u"),
    created_at=datetime(2026, 1, 1, 5, tzinfo=UTC),  # the newest of RUN
)


@pytest.mark.parametrize(
    ("names", "latest", "include_syncing", "selected", "unreadable"),
    [
        ((), False, False, ["c1", "c3", "c2", "c0"], [UNREADABLE]),  # a failure of the run's
        ((), False, True, ["c1", "c3", "c2", "c4", "c0"], [UNREADABLE]),
        ((), True, False, ["c3"], []),  # --latest asks for one checkpoint: passed over
        (("c1",), False, False, ["c1"], []),  # not named: not wanted
    ],
)
def test_an_unreadable_checkpoint_is_never_selected(
    names: tuple[str, ...],
    latest: bool,
    include_syncing: bool,
    selected: list[str],
    unreadable: list[UnreadableCheckpoint],
) -> None:
    available: list[Available] = [*RUN, UNREADABLE]
    chosen = select_checkpoints(
        available, names=names, latest=latest, include_syncing=include_syncing
    )
    assert [c.name for c in chosen.checkpoints] == selected
    assert chosen.unreadable == unreadable


@pytest.mark.parametrize("latest", [False, True])
@pytest.mark.parametrize("name", ["u-id", "u", "kind-u"])  # its id, or a name it goes by
def test_an_unreadable_checkpoint_named_is_a_usage_error(name: str, latest: bool) -> None:
    available: list[Available] = [*RUN, UNREADABLE]
    with pytest.raises(UsageError) as caught:
        select_checkpoints(available, names=("c1", name), latest=latest, what="run r")
    assert str(caught.value) == (
        "run/u (target reward_model, id u-id) in run r: "
        "its listing entry is unreadable (target: ...), so it cannot be mirrored"
    )


def test_a_name_a_readable_checkpoint_has_is_that_checkpoints() -> None:
    # Should an unreadable entry go by a readable checkpoint's name too, the name is the
    # readable one's: that one can be mirrored.
    shadow = UnreadableCheckpoint("s-id", "run/c1 (target ?, id s-id)", "...", names=("c1",))
    chosen = select_checkpoints([*RUN, shadow], names=("c1",))
    assert [c.name for c in chosen.checkpoints] == ["c1"]


def unreadable_at(hour: int | None) -> UnreadableCheckpoint:
    created = None if hour is None else datetime(2026, 1, 1, hour, 30, tzinfo=UTC)
    return UnreadableCheckpoint("u-id", "run/u", "...", created_at=created)


@pytest.mark.parametrize(
    ("hour", "names", "latest", "include_syncing", "selected", "passed_over"),
    [
        (5, (), True, False, "c3", True),  # newer than the one taken: said
        (3, (), True, False, "c3", True),  # c3 was created at 3:00, this at 3:30
        (2, (), True, False, "c3", False),  # older: not what --latest would take anyway
        (None, (), True, False, "c3", True),  # its age unknown: it may be newer
        (3, (), True, True, "c4", False),  # the syncing c4 (4:00) taken is newer
        (4, (), True, True, "c4", True),
        (5, ("c1", "c2"), True, False, "c2", False),  # not among those named
        (5, (), False, False, None, False),  # no --latest: it fails with the run instead
    ],
)
def test_latest_names_a_newer_unreadable_checkpoint_it_passed_over(
    hour: int | None,
    names: tuple[str, ...],
    latest: bool,
    include_syncing: bool,
    selected: str | None,
    passed_over: bool,
) -> None:
    unreadable = unreadable_at(hour)
    chosen = select_checkpoints(
        [*RUN, unreadable], names=names, latest=latest, include_syncing=include_syncing
    )
    if selected is not None:
        assert [c.name for c in chosen.checkpoints] == [selected]
    assert chosen.passed_over == ([unreadable] if passed_over else [])


def at_step(step: int, state: SyncState = SyncState.COMPLETE) -> Checkpoint:
    """A W&B checkpoint: its list tells no times, only steps."""
    return Checkpoint(f"v{step}", f"step-{step}", "model", None, 1, state, step)


@pytest.mark.parametrize(
    ("step", "passed_over"),
    [
        (40, True),  # a higher step than the one taken: said
        (30, False),  # the step taken: not newer
        (25, False),
        (None, True),  # its step unknown: it may be newer
    ],
)
def test_latest_of_a_run_that_tells_no_times_goes_by_step(
    step: int | None, passed_over: bool
) -> None:
    # README (W&B): --latest takes the highest step, and tells an unreadable entry newer than
    # it by its step.
    unreadable = UnreadableCheckpoint("u-id", "model/u", "...", step=step)
    chosen = select_checkpoints([at_step(10), at_step(30), at_step(20), unreadable], latest=True)
    assert [c.name for c in chosen.checkpoints] == ["step-30"]
    assert chosen.passed_over == ([unreadable] if passed_over else [])


def test_latest_of_a_run_that_tells_no_times_names_newer_ones_by_step() -> None:
    # A checkpoint of a higher step than the one taken, still uploading or of another status
    # (FAILED, say), is newer: named, as where the list tells times.
    uploading, failed = at_step(40, SyncState.SYNCING), at_step(50, SyncState.OTHER)
    older = [at_step(20, SyncState.SYNCING), at_step(25, SyncState.OTHER)]
    chosen = select_checkpoints([at_step(10), at_step(30), uploading, failed, *older], latest=True)
    assert [c.name for c in chosen.checkpoints] == ["step-30"]
    assert (chosen.syncing, chosen.other_status) == ([uploading], [failed])


@pytest.mark.parametrize(
    ("entry", "passed_over"),
    [
        # Made at the instant of the c3 taken: only the age makes one newer.
        (UnreadableCheckpoint("u-id", "run/u", "...", created_at=RUN[1].created_at), False),
        # A step of its own tells nothing against a checkpoint taken by its time.
        (UnreadableCheckpoint("u-id", "run/u", "...", step=20), True),
    ],
)
def test_latest_names_an_unreadable_checkpoint_only_when_it_may_be_newer(
    entry: UnreadableCheckpoint, passed_over: bool
) -> None:
    taken = Checkpoint("c3", "c3", "run", RUN[1].created_at, 1, SyncState.COMPLETE, step=30)
    chosen = select_checkpoints([RUN[0], taken, entry], latest=True)
    assert chosen.checkpoints == [taken]
    assert chosen.passed_over == ([entry] if passed_over else [])


def absent_at(step: int) -> AbsentCheckpoint:
    """A W&B checkpoint whose artifact version --latest found not there."""
    return AbsentCheckpoint(
        f"v{step}", f"model/step-{step}", "not there", (f"step-{step}",), step=step
    )


STEPS = [at_step(10), at_step(20), at_step(30)]


@pytest.mark.parametrize(
    ("absent", "names", "selected", "passed_over"),
    [
        ([40], (), "step-30", [40]),  # the newest absent: the next one taken, and it named
        ([50, 40], (), "step-30", [50, 40]),
        ([40], ("step-20", "step-40"), "step-20", [40]),  # named, it is passed over alike
        ([40], ("step-20", "v40"), "step-20", [40]),  # named by its id too
        ([40], ("step-10", "step-20"), "step-20", []),  # not among those named
        ([5], (), "step-30", []),  # older than the one taken: nothing to say
    ],
)
def test_latest_passes_over_checkpoints_whose_files_are_absent(
    absent: list[int], names: tuple[str, ...], selected: str, passed_over: list[int]
) -> None:
    entries = {step: absent_at(step) for step in absent}
    chosen = select_checkpoints([*STEPS, *entries.values()], names=names, latest=True)
    assert [c.name for c in chosen.checkpoints] == [selected]
    assert chosen.passed_over == [entries[step] for step in passed_over]


def test_a_checkpoint_named_whose_files_are_absent_is_no_usage_error_nor_unknown() -> None:
    # An unreadable entry named is a usage error; one --latest found absent is a checkpoint
    # listed, named as any: with all those named absent, none is there to take.
    with pytest.raises(NotFoundError, match="no complete checkpoint in the run"):
        select_checkpoints([*STEPS, absent_at(40)], names=("step-40",), latest=True)


@pytest.mark.parametrize(
    ("entry", "taken", "newer"),
    [
        (unreadable_at(5), RUN[1], True),  # its time tells
        (unreadable_at(2), RUN[1], False),
        (unreadable_at(None), RUN[1], None),  # nothing tells: it may be newer
        (UnreadableCheckpoint("u", "run/u", "...", step=40), at_step(30), True),  # no times: steps
        (UnreadableCheckpoint("u", "run/u", "...", step=20), at_step(30), False),
        (UnreadableCheckpoint("u", "run/u", "...", step=40), RUN[1], None),  # a step, a time
        (absent_at(40), at_step(30), True),
    ],
)
def test_is_newer(entry: UnreadableCheckpoint, taken: Checkpoint, newer: bool | None) -> None:
    assert is_newer(entry, taken) is newer


def made(name: str, created_at: str, key: str | None = None) -> Checkpoint:
    """A checkpoint whose list entry gives ``created_at`` as written, read as the API's is."""
    moment = TypeAdapter(Moment).validate_python(created_at)
    return Checkpoint(key or name, name, "run", moment, 1, SyncState.COMPLETE)


T0 = "2026-01-01T00:00:00"


@pytest.mark.parametrize(
    ("entries", "taken"),
    [
        # One instant, in one spelling or several: the last by name, numbers as numbers.
        ([("checkpoint-9", f"{T0}Z"), ("checkpoint-10", f"{T0}Z")], "checkpoint-10"),
        ([("checkpoint-9", f"{T0}Z"), ("checkpoint-10", f"{T0}+00:00")], "checkpoint-10"),
        (
            [("checkpoint-9", f"{T0}Z"), ("checkpoint-10", "2026-01-01T01:00:00+01:00")],
            "checkpoint-10",
        ),
        ([("checkpoint-9", f"{T0}.000Z"), ("checkpoint-10", T0)], "checkpoint-10"),  # no zone: UTC
        ([("step-2", f"{T0}Z"), ("step-10", f"{T0}Z"), ("step-1", f"{T0}Z")], "step-10"),
        ([("b", f"{T0}Z"), ("a10", f"{T0}Z"), ("10", f"{T0}Z")], "b"),
        ([("step-10", f"{T0}Z"), ("step-010", f"{T0}Z")], "step-10"),  # one number, then as text
        # A trainer and a sampler checkpoint of one name (NOTES.md), saved at one instant.
        ([("sampler_weights-step-20", f"{T0}Z"), ("weights-step-20", f"{T0}Z")], "weights-step-20"),
        # Sub-second precision: the later instant, whatever the names.
        ([("checkpoint-10", f"{T0}Z"), ("checkpoint-9", f"{T0}.5Z")], "checkpoint-9"),
        ([("checkpoint-10", f"{T0}.000001Z"), ("checkpoint-9", f"{T0}.000002Z")], "checkpoint-9"),
        (
            [("checkpoint-10", f"{T0}.999999Z"), ("checkpoint-9", "2026-01-01T00:00:01Z")],
            "checkpoint-9",
        ),
    ],
)
def test_latest_takes_one_checkpoint_of_those_made_at_once_whatever_the_api_order(
    entries: list[tuple[str, str]], taken: str
) -> None:
    # README: of checkpoints created at one instant, --latest takes the last by name; a restore
    # rerun must take the same one, whichever order the API lists them in this time.
    run = [made(name, created_at) for name, created_at in entries]
    for order in (run, run[::-1]):
        assert [c.name for c in select_checkpoints(order, latest=True).checkpoints] == [taken]


def test_latest_takes_the_greatest_id_of_checkpoints_of_one_name_made_at_once() -> None:
    # Two runs of one base model (Loops --base-model, say) can each save step-20 at one instant.
    run = [made("step-20", f"{T0}Z", "lc-b"), made("step-20", f"{T0}+00:00", "lc-a")]
    for order in (run, run[::-1]):
        assert [c.key for c in select_checkpoints(order, latest=True).checkpoints] == ["lc-b"]


HUGE = 5000  # digits: more than `int` reads from text (4300)


@pytest.mark.parametrize(
    ("names", "taken"),
    [
        (["step-" + "9" * HUGE, "step-1" + "0" * HUGE], "step-1" + "0" * HUGE),
        (["step-" + "0" * HUGE + "9", "step-10"], "step-10"),  # leading zeros count for nothing
        (["step-" + "9" * HUGE + "-a", "step-" + "9" * HUGE + "-b"], "step-" + "9" * HUGE + "-b"),
        (["epoch-2-step-9", "epoch-2-step-10"], "epoch-2-step-10"),  # each number as a number
    ],
    ids=["longer", "leading-zeros", "equal", "two-numbers"],
)
def test_latest_orders_names_with_numbers_of_any_length(names: list[str], taken: str) -> None:
    # A name is the API's text, of any length: a number in it too long for `int` must order as
    # a number still, not end the run in an internal error.
    run = [made(name, f"{T0}Z") for name in names]
    for order in (run, run[::-1]):
        assert [c.name for c in select_checkpoints(order, latest=True).checkpoints] == [taken]


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ("COMPLETE", SyncState.COMPLETE),  # a checkpoint's own status, as the pages spell it
        ("COMPLETED", SyncState.COMPLETE),  # the job-level enum's spelling
        ("SYNCING", SyncState.SYNCING),
        (None, SyncState.UNKNOWN),  # NOTES.md: null happens
        ("FAILED", SyncState.OTHER),
    ],
)
def test_sync_status_spellings(status: str | None, state: SyncState) -> None:
    assert SyncState.parse(status) is state


@pytest.mark.parametrize(
    ("available", "names", "latest", "message"),
    [
        (RUN, ("nope",), False, r"checkpoint nope not found in the run \(it has: c1, c3"),
        (
            [],
            ("nope", "nada"),
            False,
            r"checkpoint nope, nada not found in the run \(it has: none\)",
        ),
        (RUN, ("c4",), True, "no complete checkpoint"),
        ([checkpoint("s", 1, SyncState.SYNCING)], (), True, "no complete checkpoint"),
        # A status the pages do not name is not "none reported": never taken as the latest.
        ([checkpoint("f", 1, SyncState.OTHER)], (), True, "no complete checkpoint"),
        ([], (), True, "no complete checkpoint"),
        # Named, and none taken for its status: a restore of nothing, not exit 0 (which would
        # let `sync ... && resume-training` go on with nothing).
        (
            RUN,
            ("c4",),
            False,
            r"^nothing to restore from the run: run/c4 is still uploading \(its file list is "
            r"not final; --include-syncing takes it as it is\)$",
        ),
        (
            [*RUN, replace(checkpoint("f", 5, SyncState.OTHER), status="FAILED")],
            ("f", "c4"),
            False,
            r"^nothing to restore from the run: run/c4 is still uploading .*; run/f has status "
            "FAILED$",
        ),
    ],
)
def test_select_checkpoints_not_found(
    available: list[Checkpoint], names: tuple[str, ...], latest: bool, message: str
) -> None:
    with pytest.raises(NotFoundError, match=message):
        select_checkpoints(available, names=names, latest=latest)


def test_a_checkpoint_picked_by_its_id_is_held_to_what_one_named_is() -> None:
    # `--loops-checkpoint URI`: the source lists that one checkpoint alone.
    syncing = [checkpoint("s", 1, SyncState.SYNCING)]
    with pytest.raises(NotFoundError, match=r"^nothing to restore from the run: run/s is still"):
        select_checkpoints(syncing, picked=True)
    assert select_checkpoints(syncing, picked=True, include_syncing=True).named == ("run/s",)
    # Not picked (a run of one checkpoint): left out, and named so; no restore asked for.
    assert select_checkpoints(syncing).named == ()


def remote(size: int = 100, last_modified: str = "t1") -> RemoteFile:
    return RemoteFile(
        "run", "c1", 0, "a.bin", size, last_modified, "http://x", PageRef("/l", 0, 10)
    )


@pytest.mark.parametrize(
    ("recorded", "local_size", "current"),
    [
        (Recorded(100, "t1"), 100, True),
        (None, 100, False),  # never verified by us
        (Recorded(100, "t0"), 100, False),  # changed remotely
        (Recorded(99, "t1"), 100, False),  # size changed remotely
        (Recorded(100, "t1"), None, False),  # deleted locally
        (Recorded(100, "t1"), 10, False),  # truncated locally
    ],
)
def test_skip_rule(recorded: Recorded | None, local_size: int | None, current: bool) -> None:
    assert is_current(remote(), recorded, local_size) is current


@pytest.mark.parametrize(
    ("size", "part_size", "parts"),
    [
        (0, 10, [Part(0, 0, 0)]),
        (1, 10, [Part(0, 0, 1)]),
        (5, 10, [Part(0, 0, 5)]),
        (10, 10, [Part(0, 0, 10)]),
        (25, 10, [Part(0, 0, 10), Part(1, 10, 20), Part(2, 20, 25)]),
    ],
)
def test_split_parts(size: int, part_size: int, parts: list[Part]) -> None:
    assert split_parts(size, part_size) == parts
    assert sum(p.length for p in parts) == size


DONE = frozenset({0, 2})
# Parts of 10 bytes of a 35-byte file: 0-9, 10-19, 20-29, 30-34.
ALL = split_parts(35, 10)
UNDONE = [Part(1, 10, 20), Part(3, 30, 35)]


@pytest.mark.parametrize(
    ("staged", "todo"),
    [
        (None, ALL),
        (Staged(35, "t1", 10, DONE, 35), UNDONE),
        (Staged(35, "t0", 10, DONE, 35), ALL),  # remote changed since
        (Staged(30, "t1", 10, DONE, 35), ALL),
        (Staged(35, "t1", 20, DONE, 35), ALL),  # parts cut differently
        (Staged(35, "t1", 10, DONE, None), ALL),  # staging file gone
        (Staged(35, "t1", 10, DONE, 30), ALL),  # staging file truncated
        # Parts stopped part way: each from the byte it reached.
        (Staged(35, "t1", 10, DONE, 35, None, {1: 14, 3: 34}), [Part(1, 14, 20), Part(3, 34, 35)]),
        (Staged(35, "t1", 10, frozenset(), 35, None, {0: 1}), [Part(0, 1, 10), *ALL[1:]]),
        # A byte reached outside its part, or at its very start or end, counts for nothing.
        (Staged(35, "t1", 10, DONE, 35, None, {1: 25}), UNDONE),
        (Staged(35, "t1", 10, DONE, 35, None, {1: 5}), UNDONE),
        (Staged(35, "t1", 10, DONE, 35, None, {1: 10, 3: 35}), UNDONE),
        (Staged(35, "t1", 10, DONE, 35, None, {1: -3}), UNDONE),
        # A finished part is not fetched again, whatever a record of how far it got says.
        (Staged(35, "t1", 10, DONE, 35, None, {2: 25}), UNDONE),
        # Nothing reached counts where the remote file changed.
        (Staged(35, "t0", 10, DONE, 35, None, {1: 14}), ALL),
    ],
)
def test_parts_to_fetch(staged: Staged | None, todo: list[Part]) -> None:
    assert parts_to_fetch(remote(35), 10, staged) == todo


# The fewest parts a file in parts has: 0-19 and 20-34. Preallocated, its staging file holds
# what was kept only at full size, however far the parts to fetch start.
@pytest.mark.parametrize(
    ("staged", "todo"),
    [
        (Staged(35, "t1", 20, frozenset({0}), 35), [Part(1, 20, 35)]),
        (Staged(35, "t1", 20, frozenset({0}), 30), split_parts(35, 20)),  # truncated since
    ],
)
def test_parts_to_fetch_of_a_file_of_two_parts(staged: Staged, todo: list[Part]) -> None:
    assert parts_to_fetch(remote(35), 20, staged) == todo


@pytest.mark.parametrize(
    ("written", "recorded", "whole", "record"),
    [
        (14, 10, False, 14),
        (14, 12, False, 14),  # further than an earlier record
        (14, 14, False, None),  # no further: nothing new to say
        (12, 14, False, 12),  # a record ahead of the bytes written is taken back
        (10, 10, False, None),  # nothing written yet
        (20, 14, False, None),  # done: its record of being done says so
        (25, 10, False, None),  # outside the part: a record no run would trust
        (14, 10, True, None),  # the whole file came instead: resumed, it is asked for whole
    ],
)
def test_reach_to_record(written: int, recorded: int, whole: bool, record: int | None) -> None:
    assert reach_to_record(Part(1, 10, 20), written, recorded, answered_whole=whole) == record


# A file of 8 bytes in one part of 10: its staging file is not preallocated, only written in
# order, so it holds the bytes recorded if it reaches as far (and no further than the file).
ONE_PART = [Part(0, 0, 8)]


@pytest.mark.parametrize(
    ("staged", "todo"),
    [
        (Staged(8, "t1", 10, frozenset(), 4, None, {0: 4}), [Part(0, 4, 8)]),
        (Staged(8, "t1", 10, frozenset(), 6, None, {0: 4}), [Part(0, 4, 8)]),  # written on
        (Staged(8, "t1", 10, frozenset(), 8, None, {0: 4}), [Part(0, 4, 8)]),
        (Staged(8, "t1", 10, frozenset(), 3, None, {0: 4}), ONE_PART),  # truncated since
        (Staged(8, "t1", 10, frozenset(), 9, None, {0: 4}), ONE_PART),  # longer than the file
        (Staged(8, "t1", 10, frozenset(), None, None, {0: 4}), ONE_PART),  # gone
        (Staged(8, "t0", 10, frozenset(), 4, None, {0: 4}), ONE_PART),  # remote changed since
        (Staged(8, "t1", 20, frozenset(), 4, None, {0: 4}), ONE_PART),  # --part-size changed
        (Staged(8, "t1", 10, frozenset(), 0, None), ONE_PART),  # nothing reached
        # Done, killed before it was published: read back if all of it is there.
        (Staged(8, "t1", 10, frozenset({0}), 8, None, {0: 4}), []),
        (Staged(8, "t1", 10, frozenset({0}), 7, None, {0: 4}), ONE_PART),
    ],
)
def test_parts_to_fetch_of_a_file_of_one_part(staged: Staged, todo: list[Part]) -> None:
    assert parts_to_fetch(remote(8), 10, staged) == todo


@pytest.mark.parametrize(
    ("rank", "ranks", "wanted"),
    [
        (0, frozenset(), True),  # no --node-rank: every rank
        (3, frozenset(), True),
        (0, frozenset({0}), True),
        (1, frozenset({0}), False),
        (1, frozenset({0, 1}), True),
        (None, frozenset({0}), True),  # an unreadable entry's unknown rank is still reported
    ],
)
def test_files_of_the_ranks_asked_for_are_taken(
    rank: int | None, ranks: frozenset[int], wanted: bool
) -> None:
    assert FileFilter(ranks).takes_rank(rank) is wanted
    assert FileFilter(ranks).takes(rank, "model.safetensors") is wanted


@pytest.mark.parametrize(
    ("include", "exclude", "path", "taken"),
    [
        ((), (), "optimizer.pt", True),  # no pattern: every path
        (("*.safetensors",), (), "model-00001.safetensors", True),
        (("*.safetensors",), (), "optimizer.pt", False),
        (("*.safetensors",), (), "sub/dir/model.safetensors", True),  # * matches / too
        (("*.safetensors",), (), "model.safetensors.index.json", False),  # the whole path
        (("*.SAFETENSORS",), (), "model.safetensors", False),  # case counts, as on Linux
        (("*.json", "*.safetensors"), (), "config.json", True),  # any include
        (("model-?????.bin",), (), "model-00001.bin", True),
        (("[!o]*",), (), "optimizer.pt", False),
        ((), ("optimizer*",), "optimizer.pt", False),
        ((), ("optimizer*",), "model.safetensors", True),
        ((), ("*/rng_state_*",), "sub/rng_state_0.pth", False),
        ((), ("*/rng_state_*",), "rng_state_0.pth", True),  # '*/' needs a slash
        (("*.pt",), ("optimizer*",), "optimizer.pt", False),  # exclude wins
        (("*.pt",), ("optimizer*",), "scheduler.pt", True),
        (("a(b|c)",), (), "ab", False),  # regex syntax is literal
        (("a(b|c)",), (), "a(b|c)", True),
        # A trailing "/" names a directory: everything under it, as huggingface-cli reads it.
        (("sub/",), (), "sub/dir/model.safetensors", True),
        ((), ("optimizer/",), "optimizer/state.pt", False),
        ((), ("optimizer/",), "optimizer.pt", True),
        (("*",), (), None, True),  # an unreadable entry's unknown path is still reported
        ((), ("*",), None, True),
    ],
)
def test_include_and_exclude_patterns_select_paths(
    include: tuple[str, ...], exclude: tuple[str, ...], path: str | None, taken: bool
) -> None:
    files = FileFilter(frozenset(), include, exclude)
    assert files.takes_path(path) is taken
    assert files.takes(0, path) is taken
    assert FileFilter(frozenset({1}), include, exclude).takes(0, path) is False


@pytest.mark.parametrize(
    ("left_out", "taken", "message"),
    [
        (0, 0, None),  # nothing listed: no pattern to blame
        (5, 1, None),
        (0, 3, None),
        (
            5,
            0,
            r"no listed file matches --include '\*.bin' --exclude 'x' in the selected "
            r"checkpoints \(5 left out\)",
        ),
    ],
)
def test_patterns_that_leave_out_every_file_are_not_found(
    left_out: int, taken: int, message: str | None
) -> None:
    files = FileFilter(frozenset(), ("*.bin",), ("x",))
    if message is None:
        check_paths_matched(files, left_out, taken)
    else:
        with pytest.raises(NotFoundError, match=message):
            check_paths_matched(files, left_out, taken)


LISTING = [(0, "model.safetensors"), (0, "optimizer.pt"), (1, "model.safetensors"), (None, None)]


@pytest.mark.parametrize(
    ("files", "taken", "error"),
    [
        (FileFilter(), [True] * 4, None),
        (FileFilter(frozenset({1})), [False, False, True, True], None),
        (FileFilter(include=("*.pt",)), [False, True, False, True], None),
        (FileFilter(frozenset({1}), ("*.pt",)), [False, False, False, True], None),
        (FileFilter(frozenset({7})), [False, False, False, True], "no file of node rank 7"),
        # A mistyped rank beside a good one (`list`, and a sync of complete listings).
        (
            FileFilter(frozenset({0, 7})),
            [True, True, False, True],
            r"no file of node rank 7 in the selected checkpoints \(they have ranks 0, 1\)",
        ),
        (FileFilter(exclude=("*",)), [False, False, False, True], None),  # the unreadable entry
    ],
)
def test_a_tally_counts_what_a_filter_takes_of_a_listing(
    files: FileFilter, taken: list[bool], error: str | None
) -> None:
    tally = Tally(files)
    assert [tally.takes(rank, path) for rank, path in LISTING] == taken
    assert tally.ranks_listed == {0, 1}
    if error is None:
        tally.check()
    else:
        with pytest.raises(NotFoundError, match=error):
            tally.check()


def test_a_tally_of_patterns_that_took_nothing_is_not_found() -> None:
    tally = Tally(FileFilter(include=("*.bin",)))
    assert not any(tally.takes(rank, path) for rank, path in LISTING[:3])
    with pytest.raises(NotFoundError) as caught:
        tally.check()
    assert str(caught.value) == (
        "no listed file matches --include '*.bin' in the selected checkpoints (3 left out)"
    )


WHOLE = {"job": frozenset({"c1", "c2"})}


@pytest.mark.parametrize(
    ("place", "listed", "files", "whole_lists", "goes"),
    [
        (("job", "c1", 0, "a"), {("job", "c1")}, FileFilter(), {}, True),  # listed, not shown
        (("job", "c1", 1, "a"), {("job", "c1")}, FileFilter(frozenset({0})), {}, False),  # rank
        (("job", "c1", 0, "a"), {("job", "c1")}, FileFilter(exclude=("a",)), {}, False),  # path
        (("job", "c1", 0, "a"), set(), FileFilter(), {}, False),  # its files were not listed
        (("job", "c3", 1, "a"), set(), FileFilter(frozenset({0})), WHOLE, True),  # gone
        (("job", "c3", 0, "a"), set(), FileFilter(exclude=("a",)), WHOLE, True),
        (("job", "c2", 0, "a"), set(), FileFilter(), WHOLE, False),  # still in it, not selected
        (("other", "c3", 0, "a"), set(), FileFilter(), WHOLE, False),  # another run's list
        (("job", "c2", 0, "a"), {("job", "c2")}, FileFilter(), WHOLE, True),
        (("job", "c1", 0, "a"), set(), FileFilter(), {"job": frozenset()}, False),  # empty list
    ],
)
def test_unlisted_parts_go(
    place: tuple[str, str, int, str],
    listed: set[tuple[str, str]],
    files: FileFilter,
    whole_lists: dict[str, frozenset[str]],
    goes: bool,
) -> None:
    assert unlisted_parts_go(place, listed, files, whole_lists) is goes


SELECTED = [("job", "c1"), ("job", "c2"), ("other", "c1")]


@pytest.mark.parametrize(
    ("moved", "untold", "walked"),
    [
        (set(), set(), set(SELECTED)),
        ({("job", "c1")}, set(), {("job", "c2"), ("other", "c1")}),  # changed while walked
        # An entry of c2 without its rank or name, or a checkpoint whose files were not there.
        (set(), {("job", "c2")}, {("job", "c1"), ("other", "c1")}),
        (set(), {("job", None)}, {("other", "c1")}),  # an entry of any of the run's checkpoints
        (set(), {("job", "c9")}, set(SELECTED)),  # a checkpoint not selected
        ({("other", "c1")}, {("job", None)}, set()),
    ],
)
def test_walked_whole(
    moved: set[tuple[str, str]], untold: set[tuple[str, str | None]], walked: set[tuple[str, str]]
) -> None:
    assert walked_whole(SELECTED, moved, untold) == walked


@pytest.mark.parametrize(
    ("run", "checkpoint", "whole_lists", "removed"),
    [
        ("job", "c3", WHOLE, True),  # not in its run's whole list
        ("job", "c1", WHOLE, False),  # still listed
        ("other", "c3", WHOLE, False),  # its run's list was not read whole
        ("job", "c1", {"job": frozenset()}, True),  # every checkpoint removed
    ],
)
def test_removed_upstream(
    run: str, checkpoint: str, whole_lists: dict[str, frozenset[str]], removed: bool
) -> None:
    assert removed_upstream(run, checkpoint, whole_lists) is removed


@pytest.mark.parametrize(
    ("directories", "whole"),
    [
        (["c1", "c2"], {"run": frozenset({"c1", "c2"})}),
        ([], {"run": frozenset()}),  # every checkpoint removed
        (["c1", None], {}),  # an entry that does not tell its directory
    ],
)
def test_whole_list(directories: list[str | None], whole: dict[str, frozenset[str]]) -> None:
    assert whole_list("run", directories) == whole


@pytest.mark.parametrize("size", [-1, 1 << 51])
def test_implausible_sizes_are_refused(size: int) -> None:
    with pytest.raises(IntegrityError, match="not a plausible file size"):
        check_listed_size(remote(size=size))


@pytest.mark.parametrize("size", [0, 1 << 50])  # empty, and the largest taken
def test_plausible_sizes_are_taken(size: int) -> None:
    check_listed_size(remote(size=size))


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://bucket.s3.amazonaws.com/k?X-Amz-Signature=1", None),
        ("http://host/a b", "not a valid URL"),
        ("ftp://host/file", "not an http(s) URL"),
    ],
)
def test_a_presigned_url_the_client_cannot_ask_fails_its_file(
    url: str, problem: str | None
) -> None:
    if problem is None:
        check_listed_url(url)
        return
    with pytest.raises(FileError, match=f"^its presigned URL is {re.escape(problem)}"):
        check_listed_url(url)


@pytest.mark.parametrize(
    ("names", "latest", "entries", "empty"),
    [
        ((), True, [], True),  # --latest took one that lists nothing
        (("c1",), False, [], True),
        (("c1", "c2"), False, [], True),
        ((), False, [], False),  # a mirror of the whole run: empty checkpoints are no restore
        ((), True, [(0, "a")], False),
        ((), True, [(1, "a")], False),  # another rank's file: --node-rank 0 names the ranks
        ((), True, [(0, "b")], False),  # one left out by a pattern: --include says so
        ((), True, [(None, "b")], False),  # ... though its entry tells no rank
        ((), True, [(None, None)], False),  # an unreadable entry: it fails as a file
        (("c1", "c3"), False, [(0, "a")], False),  # c3 still syncing: left out, and named so
    ],
)
# Whatever the run chose of the files: with no --node-rank or pattern, too, an entry listed is
# one listed, though it tells no rank.
@pytest.mark.parametrize(
    "files",
    [FileFilter(ranks=frozenset({0}), include=("a",)), FileFilter()],
    ids=["chosen", "every-file"],
)
def test_checkpoints_asked_for_that_list_no_file_are_not_found(
    names: tuple[str, ...],
    latest: bool,
    entries: list[tuple[int | None, str | None]],
    empty: bool,
    files: FileFilter,
) -> None:
    available = [checkpoint("c1", 1), checkpoint("c2", 2), checkpoint("c3", 3, SyncState.SYNCING)]
    selection = select_checkpoints(available, names=names, latest=latest)
    tally = Tally(files)
    for rank, path in entries:
        tally.takes(rank, path)
    if not empty:
        check_files_listed(selection, tally)
        return
    named = ", ".join(f"run/{c.name}" for c in selection.checkpoints)
    with pytest.raises(NotFoundError, match=f"^no file is listed in {named}: there is nothing"):
        check_files_listed(selection, tally)


@pytest.mark.parametrize(
    ("wanted", "listed", "each", "missing"),
    [
        (set(), {0, 1}, True, None),  # every rank
        ({0}, {0, 1}, True, None),
        ({0, 1}, {0, 1}, True, None),
        ({9}, {0, 1}, True, "9"),
        ({0, 9}, {0, 1}, True, "9"),  # a typo beside a good rank
        ({0, 9}, {0, 1}, False, None),  # a listing cut short (bench) may not show rank 9 yet
        ({8, 9}, {0, 1}, False, "8, 9"),
        ({9}, set(), True, None),  # nothing listed: no rank to tell it from
    ],
)
def test_a_node_rank_no_listed_file_has_is_not_found(
    wanted: set[int], listed: set[int], each: bool, missing: str | None
) -> None:
    if missing is None:
        check_ranks_listed(frozenset(wanted), listed, each=each)
    else:
        with pytest.raises(NotFoundError, match=f"no file of node rank {missing} in the "):
            check_ranks_listed(frozenset(wanted), listed, each=each)


@pytest.mark.parametrize(
    ("named", "where"),
    [
        ((), "the selected checkpoints (they have ranks 0)"),  # a mirror of the whole run
        (("job/c30",), "job/c30 (it has ranks 0)"),  # the one --latest took
        (("job/c20", "job/c30"), "job/c20, job/c30 (they have ranks 0)"),  # --checkpoint twice
    ],
)
def test_a_node_rank_no_listed_file_has_names_the_checkpoints_asked_for(
    named: tuple[str, ...], where: str
) -> None:
    with pytest.raises(NotFoundError) as raised:
        check_ranks_listed(frozenset({1}), {0}, named=named)
    assert str(raised.value) == f"no file of node rank 1 in {where}"


@pytest.mark.parametrize(
    ("available", "message"),
    [
        ([], "no complete checkpoint in the run to take as --latest"),
        (
            [checkpoint("c4", 4, SyncState.SYNCING), UNREADABLE],
            "no complete checkpoint in the run to take as --latest (1 left out as unreadable, "
            "run/u (target reward_model, id u-id): target: ...)",
        ),
    ],
)
def test_latest_with_nothing_to_take_names_what_it_left_out_as_unreadable(
    available: list[Available], message: str
) -> None:
    with pytest.raises(NotFoundError) as caught:
        select_checkpoints(available, latest=True)
    assert str(caught.value) == message
