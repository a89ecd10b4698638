"""W&B Training: cursor walking, best/latest selection, and artifact files fetched over HTTP."""

from __future__ import annotations

import base64
import fcntl
import http.server
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import aclosing, contextmanager
from pathlib import Path

import pytest

from checkpoint_sync.errors import NotFoundError, TransientError, UsageError
from checkpoint_sync.localserver import (
    Catalog,
    Faults,
    ServedFile,
    ServedWandbCheckpoint,
    synthetic_wandb_model,
)
from checkpoint_sync.models import WandbCheckpoint
from checkpoint_sync.plan import select_checkpoints
from checkpoint_sync.sources.base import (
    LISTINGS_AHEAD,
    Checkpoint,
    RemoteFile,
    SyncState,
    UnreadableCheckpoint,
)
from checkpoint_sync.sources.wandb import WandbSource, best_checkpoint
from checkpoint_sync.sources.wandb_artifacts import (
    ArtifactFiles,
    ArtifactPath,
    parse_artifact_path,
)

from .support import (
    API_KEY,
    Result,
    ServerThread,
    api_client,
    assert_exact,
    http_serving,
    leave_in_parts,
    run_cli,
    send_answer,
    staged,
)

MODEL = "wbm-7c1f"
ARTIFACT = "team/agents/agent-001"
WANDB_KEY = "wandb-test-key-0123456789"
# Latest is step 50, the best reward step 30, the lowest loss step 40 (step 50 has no loss).
METRICS = {
    10: {"reward": 0.2, "loss": 0.9},
    20: {"reward": 0.5, "loss": 0.6},
    30: {"reward": 0.9, "loss": 0.5},
    40: {"reward": 0.7, "loss": 0.3},
    50: {"reward": 0.6},
}


def wandb_catalog(*, files: int = 3, size: int = 3000) -> Catalog:
    return Catalog(
        api_key=API_KEY,
        wandb_api_key=WANDB_KEY,
        wandb_models=[synthetic_wandb_model(MODEL, METRICS, files=files, size=size)],
    )


def serve(catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> ServerThread:
    server = ServerThread(catalog).__enter__()
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("CHECKPOINT_SYNC_WANDB_API_URL", server.url)
    monkeypatch.setenv("CHECKPOINT_SYNC_WANDB_BASE_URL", server.url)
    return server


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerThread]:
    running = serve(wandb_catalog(), monkeypatch)
    yield running
    running.__exit__(None, None, None)


def checkpoints_of(server: ServerThread) -> dict[int, ServedWandbCheckpoint]:
    return {c.step: c for c in server.catalog.wandb_models[0].checkpoints if c.step is not None}


def landed(dest: Path, step: int, file: ServedFile) -> Path:
    """The documented layout: <model_id>/step-<N>/0/<path in the artifact>."""
    return dest / MODEL / f"step-{step}" / "0" / file.name


def listed(*flags: str) -> list[str]:
    return ["list", "--wandb-model", MODEL, *flags]


def synced(dest: Path, *flags: str) -> list[str]:
    return ["sync", "--wandb-model", MODEL, "--dest", str(dest), "--concurrency", "4", *flags]


# --- selection (pure) -----------------------------------------------------------------------------


def wandb_checkpoint(step: int, **metrics: float) -> Checkpoint:
    return Checkpoint(
        key=f"id-{step}",
        name=f"step-{step}",
        run=MODEL,
        created_at=None,
        size_bytes=None,
        state=SyncState.COMPLETE,
        step=step,
        metrics=metrics,
    )


LISTED = [wandb_checkpoint(step, **metrics) for step, metrics in METRICS.items()]


@pytest.mark.parametrize(
    ("checkpoints", "metric", "minimize", "step"),
    [
        (LISTED, "reward", False, 30),
        (LISTED, "loss", True, 40),  # step 50 has no loss: it takes no part
        (LISTED, "loss", False, 10),
        ([wandb_checkpoint(1, r=0.5), wandb_checkpoint(2, r=0.5)], "r", False, 2),  # tie: later
        ([wandb_checkpoint(2, r=0.5), wandb_checkpoint(1, r=0.5)], "r", True, 2),
        ([wandb_checkpoint(1, r=0.1), wandb_checkpoint(2, r=math.nan)], "r", False, 1),
        ([wandb_checkpoint(1, r=-math.inf), wandb_checkpoint(2, r=-1.0)], "r", True, 1),
    ],
)
def test_best_checkpoint(
    checkpoints: list[Checkpoint], metric: str, minimize: bool, step: int
) -> None:
    assert best_checkpoint(checkpoints, metric, minimize=minimize).step == step


def test_best_of_a_metric_no_checkpoint_has_names_the_metrics_there_are() -> None:
    with pytest.raises(UsageError) as caught:
        best_checkpoint(LISTED, "accuracy", what="model m")
    expected = "no checkpoint of model m has the metric 'accuracy' (its metrics: loss, reward)"
    assert str(caught.value) == expected


def test_best_of_no_checkpoints_is_not_found() -> None:
    with pytest.raises(NotFoundError) as caught:
        best_checkpoint([], "reward", what="model m")
    assert str(caught.value) == "model m has no checkpoints"


def test_best_where_every_checkpoint_is_unreadable_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = synthetic_wandb_model(MODEL, {10: {"reward": 0.2}, 20: {"reward": 0.9}})
    for listed_entry in model.checkpoints:
        listed_entry.step = None  # the OpenAPI page requires an integer
    catalog = Catalog(api_key=API_KEY, wandb_api_key=WANDB_KEY, wandb_models=[model])
    server = serve(catalog, monkeypatch)
    try:
        best = run_cli(*listed("--best", "reward"))
    finally:
        server.__exit__(None, None, None)

    first = model.checkpoints[0].id
    assert best.code == 4
    assert best.stderr == (
        f"checkpoint-sync: error: W&B Training model {MODEL} has no readable checkpoints "
        f"(2 left out as unreadable, {MODEL}/step-? (id {first}): step: Input should be a "
        "valid integer)\n"
    )


@pytest.mark.parametrize(
    ("step", "passed_over"),
    [(60, True), (20, False), (None, True)],  # no step, no time: it may be newer
)
def test_latest_of_w_and_b_names_an_unreadable_checkpoint_by_its_step(
    step: int | None, passed_over: bool
) -> None:
    # W&B lists no times: only the step tells whether it is newer than step 50, the one taken.
    unreadable = UnreadableCheckpoint("u", f"{MODEL}/step-{step}", "metrics: ...", step=step)
    chosen = select_checkpoints([*LISTED, unreadable], latest=True)
    assert [c.step for c in chosen.checkpoints] == [50]
    assert chosen.passed_over == ([unreadable] if passed_over else [])


def test_latest_of_w_and_b_checkpoints_is_the_highest_step() -> None:
    shuffled = [LISTED[3], LISTED[4], LISTED[0]]
    assert [c.step for c in select_checkpoints(shuffled, latest=True).checkpoints] == [50]


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("team/agents/agent-001", ArtifactPath("team", "agents", "agent-001")),
        ("a/b/c", ArtifactPath("a", "b", "c")),
    ],
)
def test_parse_artifact_path(text: str, parsed: ArtifactPath) -> None:
    assert parse_artifact_path(text) == parsed
    assert str(parsed) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("agents/agent-001", "is not ENTITY/PROJECT/NAME"),
        ("team/agents/agent-001/x", "is not ENTITY/PROJECT/NAME"),
        ("team//agent-001", "is not ENTITY/PROJECT/NAME"),
        (
            "team/agents/agent-001:v3",
            "leave out the version (:...); each checkpoint's step<N> alias is added",
        ),
        # The versions `wandb artifact get` users name, each with the flag that takes it.
        ("team/agents/agent-001:step10", "is added: --checkpoint step-10 takes that one"),
        (
            "team/agents/agent-001:latest",
            "is added: --latest takes the newest checkpoint whose weights are there",
        ),
    ],
)
def test_malformed_artifact_paths(text: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_artifact_path(text)
    assert str(caught.value).endswith(message)


# --- listing over HTTP ----------------------------------------------------------------------------


@pytest.mark.parametrize("required_only", [False, True], ids=["last-id", "no-last-id"])
def test_the_cursor_is_walked_to_the_end_in_pages(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch, required_only: bool
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "2")
    # The page does not require last_id: without it, the cursor is the last entry's id.
    server.faults.required_only = required_only

    result = run_cli(*listed("--json"))

    assert result.code == 0, result.stderr
    rows = json.loads(result.stdout)["checkpoints"]
    assert [(r["step"], r["metrics"]) for r in rows] == list(METRICS.items())
    assert [r["id"] for r in rows] == [checkpoints_of(server)[s].id for s in METRICS]
    assert server.traffic.api_requests == 3  # 2 + 2 + 1


def test_a_cursor_that_does_not_advance_is_an_error_not_a_loop(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "2")
    server.catalog.wandb_models[0].stuck_cursor = True

    result = run_cli(*listed())

    assert result.code == 1
    assert "does not advance" in result.stderr
    assert server.traffic.api_requests == 2


@pytest.mark.parametrize(
    ("flags", "step"),
    [(["--best", "reward"], 30), (["--best", "loss", "--minimize"], 40), (["--latest"], 50)],
)
def test_the_chosen_checkpoint_is_printed_for_scripts(
    server: ServerThread, flags: list[str], step: int
) -> None:
    as_json = run_cli(*listed(*flags, "--json"))
    as_text = run_cli(*listed(*flags))

    assert as_json.code == as_text.code == 0, as_json.stderr
    (chosen,) = json.loads(as_json.stdout)["checkpoints"]
    assert chosen["id"] == checkpoints_of(server)[step].id
    assert (chosen["step"], chosen["metrics"]) == (step, METRICS[step])
    header, row = as_text.stdout.splitlines()
    assert header.split() == ["RUN", "CHECKPOINT", "ID", "STEP", "SIZE", "STATUS", "METRICS"]
    metrics = [f"{k}={v}" for k, v in sorted(METRICS[step].items())]
    assert row.split() == [
        MODEL,
        f"step-{step}",
        chosen["id"],
        str(step),
        "-",
        "complete",
        *metrics,
    ]


def strict_json(text: str) -> object:
    """``text`` parsed as RFC 8259 JSON: NaN and Infinity, which Python's own parser takes and
    JavaScript's, Go's or serde's refuse, are errors."""

    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_list_json_stays_json_when_a_metric_is_nan_or_infinite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # NaN metrics are expected (they take no part in --best); the document must still parse.
    model = synthetic_wandb_model(
        MODEL, {10: {"reward": 0.5, "loss": math.nan}, 20: {"reward": math.inf}}
    )
    catalog = Catalog(api_key=API_KEY, wandb_api_key=WANDB_KEY, wandb_models=[model])
    server = serve(catalog, monkeypatch)
    try:
        result = run_cli(*listed("--json"))
    finally:
        server.__exit__(None, None, None)

    assert result.code == 0, result.stderr
    document = strict_json(result.stdout)
    assert isinstance(document, dict)
    assert [c["metrics"] for c in document["checkpoints"]] == [
        {"reward": 0.5, "loss": None},
        {"reward": None},
    ]


@pytest.mark.parametrize(
    "name", [API_KEY, WANDB_KEY, "https://evil.example/x?X-Amz-Signature=s3cr3t"]
)
def test_a_secret_named_by_a_metric_is_not_shown_in_json_either(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # A metric's name is a key of the document's "metrics": redaction cleaned only values.
    model = synthetic_wandb_model(MODEL, {10: {name: 0.5, "loss": 0.1}})
    catalog = Catalog(api_key=API_KEY, wandb_api_key=WANDB_KEY, wandb_models=[model])
    server = serve(catalog, monkeypatch)
    try:
        as_json = run_cli(*listed("--json"))
        text = run_cli(*listed())
    finally:
        server.__exit__(None, None, None)

    assert as_json.code == text.code == 0, as_json.stderr
    for output in (as_json.stdout, text.stdout):
        assert WANDB_KEY not in output
        assert "s3cr3t" not in output
    [checkpoint] = json.loads(as_json.stdout)["checkpoints"]
    assert checkpoint["metrics"]["loss"] == 0.1
    assert "<redacted>" in "".join(checkpoint["metrics"])


@pytest.mark.parametrize(
    ("listed", "parsed"),
    [
        ({"reward": 0.5, "loss": None}, {"reward": 0.5}),  # W&B nulls a metric not logged
        ({"reward": None}, {}),
        (None, {}),  # a null map: none logged, as a missing one
    ],
)
def test_a_null_metric_is_an_absent_one(
    listed: dict[str, float | None] | None, parsed: dict[str, float]
) -> None:
    entry = {"id": "c", "step": 1, "metrics": listed}
    assert WandbCheckpoint.model_validate(entry).metrics == parsed


def test_a_checkpoint_with_a_null_metric_is_listed_and_passed_over_by_best(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = synthetic_wandb_model(
        MODEL,
        {10: {"reward": 0.2, "loss": None}, 20: {"reward": None, "loss": 0.4}, 30: {"reward": 0.1}},
    )
    catalog = Catalog(api_key=API_KEY, wandb_api_key=WANDB_KEY, wandb_models=[model])
    server = serve(catalog, monkeypatch)
    try:
        as_json = run_cli(*listed("--json"))
        as_text = run_cli(*listed())
        best_reward = run_cli(*listed("--best", "reward", "--json"))
        best_loss = run_cli(*listed("--best", "loss", "--minimize", "--json"))
    finally:
        server.__exit__(None, None, None)

    assert as_json.code == as_text.code == best_reward.code == best_loss.code == 0, as_json.stderr
    assert [c["metrics"] for c in json.loads(as_json.stdout)["checkpoints"]] == [
        {"reward": 0.2},
        {"loss": 0.4},
        {"reward": 0.1},
    ]
    assert [line.split()[-1] for line in as_text.stdout.splitlines()[1:]] == [
        "reward=0.2",
        "loss=0.4",
        "reward=0.1",
    ]
    assert [c["step"] for c in json.loads(best_reward.stdout)["checkpoints"]] == [10]
    assert [c["step"] for c in json.loads(best_loss.stdout)["checkpoints"]] == [20]


def test_a_checkpoint_listed_without_a_step_is_left_out_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Its step names its directory (step-<N>) and its artifact version (step<N>): with none, it
    # cannot be mirrored. It failed its whole page, so the whole listing; now it is left out as
    # one unreadable entry, as a Loops checkpoint of an unknown target is.
    model = synthetic_wandb_model(MODEL, {10: {"reward": 0.2}, 20: {"reward": 0.9}, 30: {}})
    stepless = model.checkpoints[1]
    stepless.step = None  # the OpenAPI page requires an integer
    catalog = Catalog(api_key=API_KEY, wandb_api_key=WANDB_KEY, wandb_models=[model])
    server = serve(catalog, monkeypatch)
    try:
        as_json = run_cli(*listed("--json"))
        as_text = run_cli(*listed())
        latest = run_cli(*listed("--latest", "--json"))
        best = run_cli(*listed("--best", "reward", "--json"))
        whole = run_cli(*synced(tmp_path, "--wandb-artifact", ARTIFACT, "--json"))
        named = run_cli(*listed("--checkpoint", stepless.id))
    finally:
        server.__exit__(None, None, None)

    where = f"{MODEL}/step-? (id {stepless.id})"
    assert as_json.code == as_text.code == latest.code == best.code == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert [c["step"] for c in document["checkpoints"]] == [10, 30]
    (left_out,) = document["left_out"]
    assert left_out["checkpoint"] == where
    assert left_out["id"] == stepless.id
    assert "step: Input should be a valid integer" in left_out["error"]
    assert f"left out: {where}: its listing entry is unreadable" in as_text.stdout
    # --latest and --best each ask for one checkpoint: they pass over it, as --latest does Loops'.
    # With no step, nothing tells whether it is newer than the one --latest takes: it says so.
    assert [c["step"] for c in json.loads(latest.stdout)["checkpoints"]] == [30]
    assert latest.stderr == (
        f"--latest took {MODEL}/step-30; a checkpoint that may be newer was left out: {where}: "
        f"{left_out['error']}\n"
    )
    assert [c["step"] for c in json.loads(best.stdout)["checkpoints"]] == [10]
    # A sync mirrors the others and fails it as one entry (exit 1).
    assert whole.code == 1, whole.stderr
    (failure,) = json.loads(whole.stdout)["failures"]
    assert failure["path"] == where
    assert sorted(p.name for p in (tmp_path / MODEL).iterdir()) == ["step-10", "step-30"]
    # Named by its id, it cannot be mirrored: a usage error in one line.
    assert named.code == 2
    assert named.stderr.count("\n") == 1
    assert f"{where} in W&B Training model {MODEL}: its listing entry" in named.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--best", "accuracy"], "has the metric 'accuracy' (its metrics: loss, reward)"),
        (["--best", "a\\b\x1b"], "has the metric 'a\\\\b\\x1b' (its"),  # escaped once
        (["--best", "reward", "--latest"], "--best, --latest and --checkpoint each pick"),
        (["--best", "reward", "--checkpoint", "step-10"], "--best, --latest and --checkpoint"),
        (["--minimize"], "--minimize goes with --best METRIC"),
        (["--wandb-artifact", "team/agents"], "is not ENTITY/PROJECT/NAME"),
    ],
)
def test_selection_usage_errors_exit_2(
    server: ServerThread, flags: list[str], message: str
) -> None:
    result = run_cli(*listed(*flags))

    assert result.code == 2
    assert message in result.stderr


def test_a_missing_w_and_b_key_names_its_own_setting(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY")

    result = run_cli(*listed())

    assert result.code == 3
    assert "set WANDB_API_KEY (or wandb_api_key in the config file)" in result.stderr


def test_a_refused_w_and_b_key_exits_3_without_showing_it(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "wrong-wandb-key-123456")

    result = run_cli(*listed())

    assert result.code == 3
    assert "check WANDB_API_KEY" in result.stderr
    assert "wrong-wandb-key-123456" not in result.stderr + result.stdout


@contextmanager
def graphql_answering(
    answer: Callable[[int, http.server.BaseHTTPRequestHandler], tuple[int, bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[list[int]]:
    """W&B's GraphQL API replaced by ``answer(n, request)`` -> (status, body) for the n-th
    request; yields the list of request numbers served."""
    served: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            served.append(len(served) + 1)
            send_answer(self, *answer(served[-1], self))

    with http_serving(Handler) as origin:
        monkeypatch.setenv("CHECKPOINT_SYNC_WANDB_BASE_URL", origin)
        yield served


def test_the_graphql_credentials_are_not_shown_when_an_error_page_echoes_them(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def echo_headers(_: int, request: http.server.BaseHTTPRequestHandler) -> tuple[int, bytes]:
        # A proxy's or firewall's error page that shows the request's headers back.
        return 400, f"bad request; your headers were:\n{request.headers}".encode()

    with graphql_answering(echo_headers, monkeypatch):
        result = run_cli(*synced(dest, "--latest", "--wandb-artifact", ARTIFACT, "--debug"))

    output = result.stdout + result.stderr
    assert result.code == 1
    assert "Authorization: Basic <redacted>" in output  # the page was shown, not its secret
    assert base64.b64encode(f"api:{WANDB_KEY}".encode()).decode() not in output


def test_a_graphql_error_is_reported_as_w_and_b_said_it(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refusal = {"data": None, "errors": [{"message": "permission denied for team/agents"}]}
    with graphql_answering(lambda _, __: (200, json.dumps(refusal).encode()), monkeypatch):
        result = run_cli(*synced(dest, "--latest", "--wandb-artifact", ARTIFACT))

    assert result.code == 1
    assert "W&B answered: permission denied for team/agents" in result.stderr


def test_a_long_graphql_error_is_cut_short_as_other_api_errors_are(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It was quoted whole (a stack trace W&B put in it, say); the key it quotes across the cut
    # is still not shown, not even its start.
    message = "permission denied " + "x" * 274 + WANDB_KEY + " and more" * 500
    refusal = {"data": None, "errors": [{"message": message}]}
    with graphql_answering(lambda _, __: (200, json.dumps(refusal).encode()), monkeypatch):
        result = run_cli(*synced(dest, "--latest", "--wandb-artifact", ARTIFACT))

    assert result.code == 1
    (line,) = result.stderr.splitlines()
    said = line.partition("W&B answered: ")[2]
    assert said == ("permission denied " + "x" * 274 + "<redacted>")[:300]
    assert WANDB_KEY[:8] not in result.stderr


def test_empty_pages_end_an_artifact_listing_whatever_they_promise(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def empty_page(n: int, _: http.server.BaseHTTPRequestHandler) -> tuple[int, bytes]:
        files = {"edges": [], "pageInfo": {"hasNextPage": True, "endCursor": f"c{n}"}}
        return 200, json.dumps({"data": {"project": {"artifact": {"files": files}}}}).encode()

    with graphql_answering(empty_page, monkeypatch) as served:
        result = run_cli(*synced(dest, "--latest", "--wandb-artifact", ARTIFACT, "--json"))

    # The checkpoint --latest took then lists no file: a restore of nothing is not found.
    assert result.code == 4, result.stderr
    assert f"no file is listed in {MODEL}/step-50" in result.stderr
    assert json.loads(result.stdout)["files"]["listed"] == 0
    assert served == [1]


# --- fetching the artifact ------------------------------------------------------------------------


def test_the_best_checkpoints_artifact_is_mirrored_byte_exact(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "2")
    best = checkpoints_of(server)[30]

    result = run_cli(*synced(dest, "--best", "reward", "--wandb-artifact", ARTIFACT, "--json"))

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["files"]["fetched"] == len(best.files) == 3
    # A restore's script reads which one --best took, and by what.
    (taken,) = json.loads(result.stdout)["checkpoints"]
    assert (taken["step"], taken["metrics"]) == (30, METRICS[30])
    for file in best.files:
        assert_exact(landed(dest, 30, file), file)
    assert [p.name for p in (dest / MODEL).iterdir()] == ["step-30"]
    # Checkpoints: 3 pages of 2; artifact files: 2 pages of 2.
    assert server.traffic.api_requests == 3 + 2

    again = run_cli(*synced(dest, "--best", "reward", "--wandb-artifact", ARTIFACT, "--json"))
    assert json.loads(again.stdout)["files"]["skipped"] == 3
    told = run_cli(*synced(dest, "--best", "reward", "--wandb-artifact", ARTIFACT))
    assert f"checkpoint {MODEL}/step-30 (step 30; reward 0.9, loss 0.5) in {dest}" in told.stdout


def test_expired_artifact_urls_are_refreshed(dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve(wandb_catalog(files=1, size=1 << 20), monkeypatch)
    try:
        server.faults.url_ttl = 0.3
        server.faults.throttle = 2 << 20  # 4 parts of 256 KiB at ~0.12 s each

        result = run_cli(
            *synced(dest, "--latest", "--wandb-artifact", ARTIFACT, "--part-size", "256KiB"),
            "--concurrency",
            "1",
            "--json",
        )

        assert result.code == 0, result.stderr
        assert json.loads(result.stdout)["url_refreshes"] > 0
        (file,) = checkpoints_of(server)[50].files
        assert_exact(landed(dest, 50, file), file)
    finally:
        server.__exit__(None, None, None)


def test_a_file_past_where_the_walk_for_another_stopped_finds_its_url_by_a_walk_of_its_own(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two pages of two files. The first page's files are refused first: the version's files are
    # walked again up to them (one page), slowly. The second page's, refused while that walk is
    # in flight, are not on it: each is looked for further on. (Stalls first: the listing is
    # over before anything is refused.)
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "2")
    server = serve(wandb_catalog(files=4), monkeypatch)
    try:
        files = checkpoints_of(server)[50].files
        answers = {f.name: ["stall", "403"] for f in files[:2]}
        answers |= {f.name: ["stall", "stall", "403"] for f in files[2:]}

        def scripted(name: str, start: int, end: int) -> str | None:
            fault = answers[name].pop(0) if answers[name] else None
            if fault == "403":
                server.faults.api_delay = 1.0
            return fault

        server.faults.hook, server.faults.stall_seconds = scripted, 0.25

        result = run_cli(*synced(dest, "--latest", "--wandb-artifact", ARTIFACT, "--json"))

        assert result.code == 0, result.stdout
        for file in files:
            assert_exact(landed(dest, 50, file), file)
        assert json.loads(result.stdout)["url_refreshes"] == 4
    finally:
        server.__exit__(None, None, None)


@pytest.mark.parametrize("part_size", ["1MiB", "64KiB"], ids=["one stream", "in parts"])
def test_bytes_that_do_not_match_the_listed_md5_never_reach_the_mirror(
    dest: Path, monkeypatch: pytest.MonkeyPatch, part_size: str
) -> None:
    server = serve(wandb_catalog(files=2, size=200_000), monkeypatch)
    try:
        damaged, intact = checkpoints_of(server)[50].files
        server.faults.corrupt = {damaged.name}
        args = synced(dest, "--latest", "--wandb-artifact", ARTIFACT, "--part-size", part_size)

        result = run_cli(*args, "--json")

        assert result.code == 1
        (failure,) = json.loads(result.stdout)["failures"]
        assert "MD5 of the bytes received is" in failure["error"]
        assert not landed(dest, 50, damaged).exists()
        assert_exact(landed(dest, 50, intact), intact)

        server.faults.corrupt = set()
        again = run_cli(*args, "--json")
        assert again.code == 0, again.stderr
        assert json.loads(again.stdout)["files"]["fetched"] == 1
        assert_exact(landed(dest, 50, damaged), damaged)
    finally:
        server.__exit__(None, None, None)


def test_a_file_resumed_whose_md5_does_not_match_is_not_counted_resumed(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both files are left with their first two 64 KiB parts; then one's other parts come wrong.
    server = serve(wandb_catalog(files=2, size=200_000), monkeypatch)
    try:
        args = synced(dest, "--latest", "--wandb-artifact", ARTIFACT, "--part-size", "64KiB")
        leave_in_parts(server, monkeypatch, args, from_byte=128 << 10)
        damaged, _ = checkpoints_of(server)[50].files
        server.faults.corrupt = {damaged.name}

        result = run_cli(*args, "--json")
    finally:
        server.__exit__(None, None, None)

    assert result.code == 1
    summary = json.loads(result.stdout)
    (failure,) = summary["failures"]
    assert "MD5 of the bytes received is" in failure["error"]
    # Its parts were dropped with it, to be fetched again: only the other file's were kept.
    assert (summary["files"]["resumed"], summary["bytes"]["resumed"]) == (1, 128 << 10)


def test_an_artifact_file_off_the_schema_fails_alone(server: ServerThread, dest: Path) -> None:
    unreadable, *readable = checkpoints_of(server)[50].files
    server.faults.unreadable = {unreadable.name}

    result = run_cli(*synced(dest, "--latest", "--wandb-artifact", ARTIFACT, "--json"))

    assert result.code == 1
    (failure,) = json.loads(result.stdout)["failures"]
    assert failure["path"] == str(landed(dest, 50, unreadable).relative_to(dest))
    assert "sizeBytes: Input should be a valid integer" in failure["error"]
    for file in readable:
        assert_exact(landed(dest, 50, file), file)


def test_fetching_without_the_artifact_path_says_what_to_pass(
    server: ServerThread, dest: Path
) -> None:
    result = run_cli(*synced(dest, "--latest"))

    assert result.code == 2
    assert "pass --wandb-artifact ENTITY/PROJECT/NAME" in result.stderr


@pytest.mark.parametrize(
    ("artifact", "message"),
    [
        ("team/other-project/agent-001", "W&B project team/other-project not found"),
        ("team/agents/agent-999", "W&B artifact team/agents/agent-999:step50: not found"),
    ],
)
def test_an_unknown_artifact_exits_4(
    server: ServerThread, dest: Path, artifact: str, message: str
) -> None:
    result = run_cli(*synced(dest, "--latest", "--wandb-artifact", artifact))

    assert result.code == 4
    assert message in result.stderr


def test_a_checkpoint_whose_artifact_version_is_missing_fails_alone(
    server: ServerThread, dest: Path
) -> None:
    """Listed, but its weights not uploaded yet (or deleted): the model's other checkpoints are
    mirrored, and it is named; alone, it is not found."""
    checkpoints = checkpoints_of(server)
    missing = min(checkpoints)
    checkpoints[missing].uploaded = False

    result = run_cli(*synced(dest, "--wandb-artifact", ARTIFACT, "--json"))

    assert result.code == 1, result.stderr
    (failure,) = json.loads(result.stdout)["failures"]
    assert failure["path"] == f"{MODEL}/step-{missing}"
    # The path is right, as the others' were found: not "check --wandb-artifact".
    assert failure["error"] == (
        f"W&B artifact {ARTIFACT}:step{missing}: not there (its weights not uploaded yet, "
        "or deleted)"
    )
    for step, checkpoint in checkpoints.items():
        for file in checkpoint.files:
            assert landed(dest, step, file).exists() == (step != missing)
            if step != missing:
                assert_exact(landed(dest, step, file), file)
    alone = run_cli(*synced(dest, "--checkpoint", f"step-{missing}", "--wandb-artifact", ARTIFACT))
    assert alone.code == 4
    assert f"{ARTIFACT}:step{missing}: not found" in alone.stderr


@pytest.mark.parametrize(
    ("flags", "step", "value"),
    [(["--best", "reward"], 30, "reward 0.9"), (["--best", "loss", "--minimize"], 40, "loss 0.3")],
)
def test_best_whose_weights_are_not_there_says_which_it_took_and_why(
    server: ServerThread, dest: Path, flags: list[str], step: int, value: str
) -> None:
    """Not only "check --wandb-artifact": the path may be right and the weights still
    uploading, which the user can tell only knowing which checkpoint --best took."""
    checkpoints_of(server)[step].uploaded = False

    result = run_cli(*synced(dest, *flags, "--wandb-artifact", ARTIFACT, "--json"))

    assert result.code == 4, result.stderr
    assert json.loads(result.stdout)["error"] == (
        f"W&B artifact {ARTIFACT}:step{step}: not found (check --wandb-artifact); it holds the "
        f"weights of {MODEL}/step-{step}, which {' '.join(flags)} took ({value}): where the path "
        "is right, they are not uploaded yet, or were deleted, and --checkpoint in place of "
        "--best takes another"
    )
    assert not (dest / MODEL).exists()


def test_a_version_deleted_while_its_files_are_listed_fails_alone_saying_so(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found on its first page, gone when the second is asked for: the artifact path was right,
    # so the run does not stop as for a version never found (exit 4), though it is the only one.
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "1")
    latest = checkpoints_of(server)[50]
    first, *others = latest.files

    def deleted_while_listed(*flags: str) -> Result:
        def delete(offset: int) -> None:
            server.faults.on_page = None
            latest.uploaded = False

        latest.uploaded = True
        server.faults.on_page = delete
        return run_cli(*synced(dest, "--latest", "--wandb-artifact", ARTIFACT, *flags))

    text = deleted_while_listed()
    summary = deleted_while_listed("--json")

    gone = f"W&B artifact {ARTIFACT}:step50: deleted after its first page of files was read"
    assert text.code == summary.code == 1, text.stderr
    assert text.stderr == f"checkpoint-sync: error: {MODEL}/step-50: {gone}\n"
    assert json.loads(summary.stdout)["failures"] == [{"path": f"{MODEL}/step-50", "error": gone}]
    assert_exact(landed(dest, 50, first), first)
    assert not any(landed(dest, 50, file).exists() for file in others)


def not_there(step: int) -> str:
    return (
        f"W&B artifact {ARTIFACT}:step{step}: not there (its weights not uploaded yet, or deleted)"
    )


def passed_over(taken: int, *newer: int) -> str:
    """What --latest says on stderr of the newer checkpoints whose weights are not there."""
    return "".join(
        f"--latest took {MODEL}/step-{taken}; a newer checkpoint was left out: "
        f"{MODEL}/step-{step}: {not_there(step)}\n"
        for step in newer
    )


def asked(*steps: int) -> list[str]:
    """The GraphQL queries for the files of these versions, one each, in this order."""
    return [f"agent-001:step{step}" for step in steps]


@pytest.mark.parametrize(("missing", "taken"), [((), 50), ((50,), 40), ((50, 40), 30)])
def test_latest_takes_the_newest_checkpoint_whose_weights_are_there(
    server: ServerThread, dest: Path, missing: tuple[int, ...], taken: int
) -> None:
    """The Training API lists a checkpoint once it is saved, and its weights come after: a
    restore right then takes the newest one that can be restored, and says what it passed over."""
    checkpoints = checkpoints_of(server)
    for step in missing:
        checkpoints[step].uploaded = False
    args = synced(dest, "--latest", "--wandb-artifact", ARTIFACT)

    text = run_cli(*args)
    quiet = run_cli(*args, "--quiet")
    server.traffic.versions_asked.clear()
    summary = run_cli(*args, "--json")

    assert text.code == quiet.code == summary.code == 0, text.stderr
    # Named in the list's order, as checkpoints passed over for other reasons are.
    note = passed_over(taken, *sorted(missing))
    assert quiet.stderr == summary.stderr == note
    assert text.stderr.startswith(note)
    document = json.loads(summary.stdout)
    assert [c["checkpoint"] for c in document["checkpoints"]] == [f"{MODEL}/step-{taken}"]
    assert document["passed_over"] == [
        {"checkpoint": f"{MODEL}/step-{step}", "error": not_there(step)} for step in sorted(missing)
    ]
    assert [p.name for p in (dest / MODEL).iterdir()] == [f"step-{taken}"]
    for file in checkpoints[taken].files:
        assert_exact(landed(dest, taken, file), file)
    # Newest first, one at a time, up to the first there: its one page of files, asked for
    # once, is what the walk mirrors it from.
    assert server.traffic.versions_asked == asked(*missing, taken)


def test_latest_where_no_version_is_there_stops_as_not_found_after_a_few(
    server: ServerThread, dest: Path
) -> None:
    # None there of those --latest looks at: the path is more likely wrong (exit 4, as before),
    # and a long model must not cost a request per checkpoint.
    for checkpoint in checkpoints_of(server).values():
        checkpoint.uploaded = False

    every = run_cli(*synced(dest, "--latest", "--wandb-artifact", ARTIFACT, "--json"))
    every_asked = list(server.traffic.versions_asked)
    server.traffic.versions_asked.clear()
    named = ["--checkpoint", "step-10", "--checkpoint", "step-20"]
    both = run_cli(*synced(dest, "--latest", *named, "--wandb-artifact", ARTIFACT))

    assert every.code == both.code == 4, every.stderr
    # Older ones were not looked for: where the path is right, the newest are still uploading,
    # which the message says too, naming those looked for.
    not_found = (
        f"W&B artifact {ARTIFACT}:step50: not found (check --wandb-artifact); nor are step40, "
        "step30 and step20, and older versions were not looked for: where the path is right, "
        "the weights of these 4 newest checkpoints are not uploaded yet, and --checkpoint takes "
        "an older one"
    )
    assert json.loads(every.stdout)["error"] == not_found
    assert every_asked == asked(50, 40, 30, 20)  # MOST_LOOKED_FOR
    assert both.stderr == (
        f"checkpoint-sync: error: W&B artifact {ARTIFACT}:step20: not found (check "
        "--wandb-artifact)\n"
    )
    assert server.traffic.versions_asked == asked(20, 10)
    assert not dest.exists() or not (dest / MODEL).exists()


def test_latest_of_those_named_takes_the_newest_whose_weights_are_there(
    server: ServerThread, dest: Path
) -> None:
    checkpoints_of(server)[40].uploaded = False
    named = ["--checkpoint", "step-20", "--checkpoint", checkpoints_of(server)[40].id]

    result = run_cli(*synced(dest, "--latest", *named, "--wandb-artifact", ARTIFACT))

    assert result.code == 0, result.stderr
    assert result.stderr.startswith(passed_over(20, 40))
    assert [p.name for p in (dest / MODEL).iterdir()] == ["step-20"]
    assert server.traffic.versions_asked == asked(40, 20)


def test_delete_keeps_the_checkpoint_latest_passed_over(server: ServerThread, dest: Path) -> None:
    # Its version is missing (deleted, or a new upload under way), but the Training API still
    # lists it: it is not removed upstream, and what the mirror holds of it stays.
    assert run_cli(*synced(dest, "--wandb-artifact", ARTIFACT)).code == 0
    newest = checkpoints_of(server)[50]
    newest.uploaded = False

    result = run_cli(*synced(dest, "--latest", "--delete", "--wandb-artifact", ARTIFACT, "--json"))

    assert result.code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["removed_upstream"] == []
    assert document["files"]["deleted"] == 0
    assert [c["checkpoint"] for c in document["checkpoints"]] == [f"{MODEL}/step-40"]
    assert document["passed_over"] == [{"checkpoint": f"{MODEL}/step-50", "error": not_there(50)}]
    for file in newest.files:
        assert_exact(landed(dest, 50, file), file)


def test_latest_asks_again_for_the_page_it_found_once_it_waited_for_the_lock(
    server: ServerThread, dest: Path
) -> None:
    # The page of files found while looking is read before the lock: after a wait for another
    # run, its URLs may have expired, and each file would cost a refresh.
    checkpoints_of(server)[50].uploaded = False
    server.faults.url_ttl = 0.5
    (dest / ".checkpoint-sync").mkdir(parents=True)
    other_run = os.open(dest / ".checkpoint-sync" / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(other_run, fcntl.LOCK_EX)
    threading.Timer(1.0, os.close, [other_run]).start()

    result = run_cli(
        *synced(dest, "--latest", "--wandb-artifact", ARTIFACT, "--wait-lock", "--json")
    )

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["url_refreshes"] == 0
    for file in checkpoints_of(server)[40].files:
        assert_exact(landed(dest, 40, file), file)
    # Looked for before the wait, its first page asked for again after it.
    assert server.traffic.versions_asked == asked(50, 40, 40)


def test_list_latest_shows_the_checkpoint_sync_latest_takes(
    server: ServerThread, dest: Path
) -> None:
    newest = checkpoints_of(server)[50]
    newest.uploaded = False
    dest.mkdir()  # a mirror not synced yet

    looked = run_cli(*listed("--latest", "--wandb-artifact", ARTIFACT))
    as_json = run_cli(*listed("--latest", "--wandb-artifact", ARTIFACT, "--json"))
    server.traffic.versions_asked.clear()
    compared = run_cli(*listed("--latest", "--wandb-artifact", ARTIFACT, "--dest", str(dest)))
    compared_asked = list(server.traffic.versions_asked)
    server.traffic.versions_asked.clear()
    unlooked = run_cli(*listed("--latest", "--json"))

    assert looked.code == as_json.code == compared.code == unlooked.code == 0, looked.stderr
    _, row = looked.stdout.splitlines()
    assert row.split()[:2] == [MODEL, "step-40"]
    assert looked.stderr == as_json.stderr == compared.stderr == passed_over(40, 50)
    document = json.loads(as_json.stdout)
    assert [c["step"] for c in document["checkpoints"]] == [40]
    assert document["left_out"] == [
        {"checkpoint": f"{MODEL}/step-50", "id": newest.id, "error": not_there(50)}
    ]
    # With --dest, the version found serves the comparison with its one page of files.
    assert "absent" in compared.stdout.splitlines()[1].split()
    assert compared_asked == asked(50, 40)
    # Without the artifact path, the versions cannot be looked for: the highest step is shown,
    # and no GraphQL request is made.
    assert [c["step"] for c in json.loads(unlooked.stdout)["checkpoints"]] == [50]
    assert server.traffic.versions_asked == []


@pytest.mark.parametrize("more_promised", [False, True], ids=["whole", "ended-on-a-promise"])
def test_delete_removes_a_checkpoint_removed_upstream_once_the_list_was_read_whole(
    dest: Path, monkeypatch: pytest.MonkeyPatch, more_promised: bool
) -> None:
    catalog = wandb_catalog(files=2, size=2000)
    model = catalog.wandb_models[0]
    server = serve(catalog, monkeypatch)
    try:
        assert run_cli(*synced(dest, "--wandb-artifact", ARTIFACT)).code == 0
        server.call(lambda: model.checkpoints.remove(checkpoints_of(server)[10]))
        # The walk then ends on an empty page that says there is more: the list may go on.
        model.more_promised = more_promised
        result = run_cli(*synced(dest, "--wandb-artifact", ARTIFACT, "--delete", "--json"))
    finally:
        server.__exit__(None, None, None)

    assert result.code == 0, result.stderr
    deleted = json.loads(result.stdout)["removed_upstream"]
    assert deleted == ([] if more_promised else [f"{MODEL}/step-10"])
    assert (dest / MODEL / "step-10").exists() is more_promised
    assert all((dest / MODEL / f"step-{step}").is_dir() for step in METRICS if step != 10)


@pytest.mark.anyio
async def test_a_list_read_again_is_whole_only_if_this_read_was(server: ServerThread) -> None:
    # A run that waited for the mirror's lock reads the list again: one found whole before the
    # wait must not stand for a read that ended on a page promising more.
    async with api_client(server.url, WANDB_KEY, "WANDB_API_KEY") as api:
        source = WandbSource(api, MODEL, artifacts=None)
        await source.checkpoints()
        assert source.listed_whole() == {MODEL: frozenset(f"step-{s}" for s in METRICS)}
        server.catalog.wandb_models[0].more_promised = True
        await source.checkpoints()

    assert source.listed_whole() == {}


@pytest.mark.parametrize("unreadable", [False, True], ids=["readable", "a-step-unlisted"])
def test_the_parts_of_a_checkpoint_deleted_upstream_go(
    dest: Path, monkeypatch: pytest.MonkeyPatch, unreadable: bool
) -> None:
    catalog = wandb_catalog(files=2, size=200_000)
    model = catalog.wandb_models[0]
    if unreadable:  # the list does not tell every directory: nothing can be known gone
        model.checkpoints.append(ServedWandbCheckpoint("no-step", None, {}))
    server = serve(catalog, monkeypatch)
    try:
        args = synced(dest, "--wandb-artifact", ARTIFACT, "--part-size", "64KiB")
        leave_in_parts(server, monkeypatch, args, from_byte=128 << 10)
        assert staged(dest) == {f"{MODEL}/step-{step}" for step in METRICS}
        server.call(lambda: model.checkpoints.remove(checkpoints_of(server)[10]))

        result = run_cli(*synced(dest, "--wandb-artifact", ARTIFACT, "--latest"))
    finally:
        server.__exit__(None, None, None)

    assert result.code == 0, result.stderr
    left = {10, 20, 30, 40} if unreadable else {20, 30, 40}
    assert staged(dest) == {f"{MODEL}/step-{step}" for step in left}


def test_a_missing_version_keeps_its_parts_and_does_not_keep_those_the_others_no_longer_list(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkpoint whose version is missing tells nothing of its files, which may be back (an
    # upload late): their parts stay. The other checkpoints were listed whole: the parts of a
    # file their listing no longer shows go, as they would in a run with every version there.
    catalog = wandb_catalog(files=2, size=200_000)
    server = serve(catalog, monkeypatch)
    try:
        args = synced(dest, "--wandb-artifact", ARTIFACT, "--part-size", "64KiB")
        leave_in_parts(server, monkeypatch, args, from_byte=128 << 10)
        staging = dest / ".checkpoint-sync" / "staging"
        assert len(list(staging.iterdir())) == 2 * len(METRICS)
        checkpoints = checkpoints_of(server)
        checkpoints[10].uploaded = False
        server.call(checkpoints[20].files.pop)  # removed upstream

        missing = run_cli(*args, "--json")
        assert missing.code == 1, missing.stderr
        assert staged(dest) == {f"{MODEL}/step-10"}
        assert len(list(staging.iterdir())) == 2
        checkpoints[10].uploaded = True
        server.traffic.ranges.clear()
        back = run_cli(*args)
    finally:
        server.__exit__(None, None, None)

    (failure,) = json.loads(missing.stdout)["failures"]
    assert failure["path"] == f"{MODEL}/step-10"
    assert back.code == 0, back.stderr
    for file in checkpoints[10].files:
        assert_exact(landed(dest, 10, file), file)
    # Resumed from its parts, not fetched again.
    assert sorted(start for _, start, _ in server.traffic.ranges) == sorted(
        start for _ in checkpoints[10].files for start in range(128 << 10, 200_000, 64 << 10)
    )
    assert list(staging.iterdir()) == []


@pytest.mark.anyio
async def test_the_next_checkpoints_artifact_files_are_asked_for_while_one_is_planned() -> None:
    metrics: dict[int, dict[str, float | None]] = {step: {} for step in range(10, 130, 10)}
    catalog = Catalog(wandb_api_key=WANDB_KEY, wandb_models=[synthetic_wandb_model(MODEL, metrics)])
    basic = base64.b64encode(f"api:{WANDB_KEY}".encode()).decode()
    with ServerThread(catalog, Faults(api_delay=0.05)) as server:  # a far API
        async with (
            api_client(server.url, WANDB_KEY, "WANDB_API_KEY") as api,
            api_client(server.url, basic, "WANDB_API_KEY", scheme="Basic") as graphql,
        ):
            artifacts = ArtifactFiles(graphql, parse_artifact_path(ARTIFACT))
            source = WandbSource(api, MODEL, artifacts=artifacts)
            selected = [c for c in await source.checkpoints() if isinstance(c, Checkpoint)]
            listed = server.traffic.api_requests  # the checkpoint list
            pages = [page async for page in source.file_pages(selected)]
        # Its latency is paid once for 8 versions' files, not checkpoint after checkpoint.
        # 8 ahead, and the one being walked if its answer is still to come.
        assert LISTINGS_AHEAD <= server.traffic.api_in_flight.most <= 1 + LISTINGS_AHEAD
        assert server.traffic.api_requests == listed + 12  # each version's files asked once
    # Each checkpoint's files, in the order of the checkpoints.
    files = [(f.checkpoint, f.path) for page in pages for f in page if isinstance(f, RemoteFile)]
    served = catalog.wandb_models[0].checkpoints
    assert files == [(f"step-{c.step}", f.name) for c in served for f in c.files]


@pytest.mark.anyio
async def test_a_version_asked_for_ahead_is_tried_once_and_retried_once_it_is_wanted() -> None:
    # As for Baseten's pages: a query asked for ahead that the API refuses (429) does not retry
    # on its own, sending a walk's worth of retries for each version kept ahead.
    catalog = Catalog(wandb_api_key=WANDB_KEY, wandb_models=[synthetic_wandb_model(MODEL, METRICS)])
    basic = base64.b64encode(f"api:{WANDB_KEY}".encode()).decode()
    with ServerThread(catalog) as server:
        server.faults.api_faults = ["429"] * 10
        async with api_client(server.url, basic, "WANDB_API_KEY", "Basic", attempts=3) as graphql:
            artifacts = ArtifactFiles(graphql, parse_artifact_path(ARTIFACT))
            first = artifacts.first_page("step10", 100)
            with pytest.raises(TransientError):
                await first
            assert server.traffic.api_requests == 1  # asked for ahead: once
            with pytest.raises(TransientError, match="HTTP 429"):
                await anext(artifacts.pages("step10", 100, first))
        assert server.traffic.api_requests == 1 + 3  # then wanted, with retries of its own


@pytest.mark.anyio
async def test_a_version_asked_for_ahead_is_asked_for_again_after_its_retry_after() -> None:
    catalog = Catalog(wandb_api_key=WANDB_KEY, wandb_models=[synthetic_wandb_model(MODEL, METRICS)])
    basic = base64.b64encode(f"api:{WANDB_KEY}".encode()).decode()
    with ServerThread(catalog, Faults(api_faults=["429"], retry_after="1")) as server:
        async with api_client(server.url, basic, "WANDB_API_KEY", "Basic") as graphql:
            artifacts = ArtifactFiles(graphql, parse_artifact_path(ARTIFACT))
            started = time.monotonic()
            first = artifacts.first_page("step10", 100)
            with pytest.raises(TransientError):
                await first
            async with aclosing(artifacts.pages("step10", 100, first)) as pages:
                assert await anext(pages)
            # Asked for again at once, it would have been refused again (429, Retry-After: 1).
            assert time.monotonic() - started >= 1.0
