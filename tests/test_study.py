"""The human-study app (spade_lib.study) through Flask's test client: folder checks, the page
flow, the JSON API's errors (each leaving the database as it was), resume order, timing, export."""

from __future__ import annotations

import json
import math
import re
import shutil
import sqlite3
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
from study_folder import write_study_folder

from spade_lib import study


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic 8-task folder (shared, read-only: tests that break it copy it first)."""
    return write_study_folder(tmp_path_factory.mktemp("study") / "tasks")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "answers.sqlite"


@pytest.fixture
def client(folder: Path, db: Path):
    return study.create_app(folder, db).test_client()


def _rows(db: Path) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT * FROM answers ORDER BY rater, task_id").fetchall()
    finally:
        conn.close()


def _post(client, body) -> tuple[int, dict]:
    response = client.post("/api/answer", json=body)
    return response.status_code, response.get_json()


def _shown_task(client, rater: str) -> tuple[str, str]:
    """The task id the task page shows ``rater`` and the page's HTML."""
    response = client.get(f"/r/{rater}/task")
    assert response.status_code == 200, response.status_code
    html = response.get_data(as_text=True)
    return re.search(r'data-task-id="([^"]+)"', html).group(1), html


def _tasks(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "tasks.csv")


# ---- the task folder ------------------------------------------------------------------------

def test_valid_folder_gives_typed_tasks(folder: Path) -> None:
    tasks = study.validate_task_folder(folder)
    assert list(tasks.columns) == list(study.TASK_COLUMNS)
    assert len(tasks) == 8 and tasks["task_id"].is_unique
    assert tasks["sample"].dtype == "int64" and tasks["neuron"].dtype == "int64"
    assert (tasks["correct_side"] == "left").sum() == 4
    assert set(map(tuple, tasks[["neuron_kind", "visualization"]].values)) == {
        ("correct", "dense"), ("correct", "SPADE"), ("predicted", "dense"),
        ("predicted", "SPADE")}


def _edit_csv(column: str, value: str):
    def edit(root: Path) -> None:
        frame = pd.read_csv(root / "tasks.csv", dtype=str)
        frame.loc[2, column] = value
        frame.to_csv(root / "tasks.csv", index=False)
    return edit


def _edit_json(name: str, data):
    return lambda root: (root / name).write_text(json.dumps(data))


BREAKAGES = {
    "no tasks.csv": (lambda r: (r / "tasks.csv").unlink(), "no tasks.csv"),
    "missing image": (lambda r: (r / "images" / "t0003-vis.png").unlink(), "t0003-vis.png"),
    "missing example image": (lambda r: (r / "example" / "left.png").unlink(), "left.png"),
    "not a png": (lambda r: (r / "images" / "t0002-left.png").write_bytes(b"GIF89a..."),
                  "t0002-left.png are not PNG"),
    "bad kind": (_edit_csv("neuron_kind", "true"), "'neuron_kind' of task 't0003' is 'true'"),
    "bad visualization": (_edit_csv("visualization", "spade"), "'visualization'"),
    "bad side": (_edit_csv("correct_side", "middle"), "'correct_side'"),
    "bad sample": (_edit_csv("sample", "1.5"), "'sample' of task 't0003' is '1.5'"),
    "negative neuron": (_edit_csv("neuron", "-2"), "'neuron' of task 't0003' is -2"),
    "empty class": (_edit_csv("class_name", " "), "class_name of task 't0003' is empty"),
    "duplicate id": (_edit_csv("task_id", "t0001"), "not unique: t0001"),
    "unsafe id": (_edit_csv("task_id", "../x"), "'../x'"),
    "missing column": (lambda r: pd.read_csv(r / "tasks.csv").drop(columns="neuron").to_csv(
        r / "tasks.csv", index=False), "missing ['neuron']"),
    "extra column": (lambda r: pd.read_csv(r / "tasks.csv").assign(extra=1).to_csv(
        r / "tasks.csv", index=False), "unknown ['extra']"),
    "no rows": (lambda r: (r / "tasks.csv").write_text(",".join(study.TASK_COLUMNS) + "\n"),
                "no tasks"),
    "example answer": (_edit_json("example/example.json", {"answer": "up", "why": "x"}),
                       "answer is 'up'"),
    "example keys": (_edit_json("example/example.json", {"answer": "left"}), "'why'"),
    "example empty why": (_edit_json("example/example.json", {"answer": "left", "why": ""}),
                          "why must be a sentence"),
    "meta count": (_edit_json("meta.json", {"preset": "x", "n_tasks": 9}),
                   "n_tasks is 9 but tasks.csv has 8"),
    "meta keys": (_edit_json("meta.json", {"n_tasks": 8}), "'preset' and 'n_tasks'"),
    "meta json": (lambda r: (r / "meta.json").write_text("{"), "meta.json is not valid JSON"),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_broken_folder_is_refused_naming_the_problem(folder: Path, tmp_path: Path,
                                                     name: str) -> None:
    broken = shutil.copytree(folder, tmp_path / "broken")
    breakage, message = BREAKAGES[name]
    breakage(broken)
    with pytest.raises(ValueError, match=re.escape(message)):
        study.validate_task_folder(broken)
    with pytest.raises(ValueError, match=re.escape(message)):
        study.create_app(broken, tmp_path / "a.sqlite")


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        study.validate_task_folder(tmp_path / "nowhere")


# ---- pages ----------------------------------------------------------------------------------

def test_full_flow_through_pages_and_api(client, folder: Path, db: Path) -> None:
    tasks = _tasks(folder)
    assert b"rater id" in client.get("/").data
    start = client.get("/start?rater=alice")
    assert start.status_code == 302 and start.location.endswith("/r/alice/instructions/1")
    step1 = client.get("/r/alice/instructions/1").get_data(as_text=True)
    for caption in ("Full image", "Neuron visualization", "Left crop", "Right crop"):
        assert caption in step1
    example = json.loads((folder / "example" / "example.json").read_text())
    step2 = client.get("/r/alice/instructions/2").get_data(as_text=True)
    assert example["why"] not in step2, "the example's answer shows before the rater picks"
    wrong = "left" if example["answer"] == "right" else "right"
    picked = client.get(f"/r/alice/instructions/2?pick={wrong}").get_data(as_text=True)
    assert example["why"] in picked and f"The answer is: {example['answer'].capitalize()}" in picked
    assert 'class="answer wrong"' in picked
    assert 'class="answer"' in client.get(
        f"/r/alice/instructions/2?pick={example['answer']}").get_data(as_text=True)
    step3 = client.get("/r/alice/instructions/3").get_data(as_text=True)
    assert "Decline (neither / both match)" in step3
    assert client.get("/r/alice/instructions/4").status_code == 404
    assert client.get("/r/alice/instructions/2?pick=up").status_code == 400
    assert client.get("/r/alice/done").status_code == 302

    seen = []
    for k in range(1, 9):
        task_id, html = _shown_task(client, "alice")
        assert f"Task {k} of 8" in html
        for kind in study.IMAGE_KINDS:
            assert f'src="/img/{task_id}/{kind}"' in html
        # nothing on the page tells the class, the neuron's kind or the visualization's kind
        for secret in [*tasks["class_name"], "SPADE", "dense", "predicted"]:
            assert secret not in html, secret
        choice = ["left", "right", "decline"][k % 3]
        status, body = _post(client, {"rater": "alice", "task_id": task_id, "choice": choice})
        assert status == 200 and body["answered"] == k and body["total"] == 8
        assert "correct_side" not in body
        seen.append((task_id, choice))
    assert sorted(t for t, _ in seen) == sorted(tasks["task_id"])
    done = client.get("/r/alice/task")
    assert done.status_code == 302 and done.location.endswith("/r/alice/done")
    finish = client.get("/r/alice/done").get_data(as_text=True)
    assert "all 8 tasks" in finish and "(3 declined)" in finish
    side = dict(zip(tasks["task_id"], tasks["correct_side"], strict=True))
    assert [(r[1], r[2], r[3]) for r in _rows(db)] == sorted(
        (t, c, side[t]) for t, c in seen)
    assert client.get("/api/progress?rater=alice").get_json() == {
        "rater": "alice", "answered": 8, "total": 8, "next_task": None}


@pytest.mark.parametrize("rater", ["", "a b", "x" * 41, "caf\u00e9", "a/b", "<script>"])
def test_start_refuses_bad_rater_ids(client, rater: str) -> None:
    response = client.get("/start", query_string={"rater": rater})
    assert response.status_code == 400
    assert b'class="error"' in response.data and b"<script>" not in response.data


def test_rater_id_of_40_characters_is_accepted(client) -> None:
    assert client.get("/start", query_string={"rater": "a-_9" * 10}).status_code == 302
    assert client.get("/r/" + "x" * 41 + "/task").status_code == 400


def test_pages_come_with_a_strict_policy_and_only_local_hosts(client) -> None:
    response = client.get("/")
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert not re.search(r'(?:src|href)="(?:https?:)?//', response.get_data(as_text=True))
    assert client.get("/", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/", headers={"Host": "127.0.0.1:8765"}).status_code == 200


def test_database_is_in_wal_mode(client, db: Path) -> None:
    client.get("/r/bob/task")
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


# ---- images ---------------------------------------------------------------------------------

def test_images_by_task_id_and_no_path_traversal(client, folder: Path) -> None:
    image = client.get("/img/t0003/vis")
    assert image.status_code == 200 and image.mimetype == "image/png"
    assert image.data == (folder / "images" / "t0003-vis.png").read_bytes()
    assert client.get("/example/right").data == (folder / "example" / "right.png").read_bytes()
    for url in ("/img/t0003/secret", "/img/t9999/full", "/img/..%2Ftasks.csv/full",
                "/img/..%2F..%2Fetc%2Fpasswd/full", "/img/t0003/..%2F..%2Fmeta.json",
                "/img/../tasks.csv", "/example/..%2Fmeta.json", "/example/example.json",
                "/images/t0003-vis.png", "/tasks.csv", "/meta.json"):
        response = client.get(url)
        assert response.status_code == 404, url
        assert b"zebra" not in response.data and b"preset" not in response.data, url


# ---- the API's errors -----------------------------------------------------------------------

BAD_BODIES = {
    "not json": (b"{rater: alice", "application/json", 400),
    "form": (b"rater=alice&task_id=t0001&choice=left", "application/x-www-form-urlencoded", 400),
    "list": (json.dumps(["alice", "t0001", "left"]).encode(), "application/json", 400),
    "missing key": (json.dumps({"rater": "alice", "task_id": "t0001"}).encode(),
                    "application/json", 400),
    "extra key": (json.dumps({"rater": "alice", "task_id": "t0001", "choice": "left",
                              "seconds": 1}).encode(), "application/json", 400),
    "unknown choice": (json.dumps({"rater": "alice", "task_id": "t0001", "choice": "up"}).encode(),
                       "application/json", 400),
    "choice case": (json.dumps({"rater": "alice", "task_id": "t0001", "choice": "Left"}).encode(),
                    "application/json", 400),
    "choice type": (json.dumps({"rater": "alice", "task_id": "t0001", "choice": 1}).encode(),
                    "application/json", 400),
    "bad rater": (json.dumps({"rater": "al ice", "task_id": "t0001", "choice": "left"}).encode(),
                  "application/json", 400),
    "empty rater": (json.dumps({"rater": "", "task_id": "t0001", "choice": "left"}).encode(),
                    "application/json", 400),
    "long rater": (json.dumps({"rater": "a" * 41, "task_id": "t0001", "choice": "left"}).encode(),
                   "application/json", 400),
    "rater type": (json.dumps({"rater": ["alice"], "task_id": "t0001", "choice": "left"}).encode(),
                   "application/json", 400),
    "task type": (json.dumps({"rater": "alice", "task_id": 1, "choice": "left"}).encode(),
                  "application/json", 400),
    "unknown task": (json.dumps({"rater": "alice", "task_id": "t9999", "choice": "left"}).encode(),
                     "application/json", 404),
    "traversal task": (json.dumps({"rater": "alice", "task_id": "../t0001",
                                   "choice": "left"}).encode(), "application/json", 404),
    "too large": (json.dumps({"rater": "alice", "task_id": "t0001",
                              "choice": "x" * 20_000}).encode(), "application/json", 413),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_answer_is_refused_and_changes_nothing(client, db: Path, name: str) -> None:
    assert _post(client, {"rater": "alice", "task_id": "t0002", "choice": "right"})[0] == 200
    before = _rows(db)
    data, content_type, code = BAD_BODIES[name]
    response = client.post("/api/answer", data=data, content_type=content_type)
    assert response.status_code == code
    assert isinstance(response.get_json()["error"], str) and response.get_json()["error"]
    assert _rows(db) == before and len(before) == 1


def test_second_answer_to_a_task_is_a_conflict_and_changes_nothing(client, db: Path) -> None:
    assert _post(client, {"rater": "alice", "task_id": "t0001", "choice": "left"})[0] == 200
    before = _rows(db)
    status, body = _post(client, {"rater": "alice", "task_id": "t0001", "choice": "right"})
    assert status == 409 and "already answered" in body["error"]
    assert _rows(db) == before and before[0][2] == "left"
    # another rater may still answer the same task
    assert _post(client, {"rater": "bob", "task_id": "t0001", "choice": "right"})[0] == 200
    assert len(_rows(db)) == 2


def test_wrong_method_is_refused(client) -> None:
    assert client.get("/api/answer").status_code == 405
    assert client.get("/api/progress?rater=a%20b").status_code == 400


# ---- order and resuming ---------------------------------------------------------------------

def test_order_is_a_seeded_permutation_per_rater(folder: Path) -> None:
    ids = list(_tasks(folder)["task_id"])
    orders = {r: study.task_order(ids, r) for r in ("alice", "bob", "carol", "dave", "erin")}
    assert all(sorted(o) == sorted(ids) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) > 1, "every rater gets the same order"
    assert study.task_order(list(reversed(ids)), "alice") == orders["alice"]
    assert study.task_order(ids, "alice", seed=1) != orders["alice"]
    with pytest.raises(ValueError, match="rater id 'a b'"):
        study.task_order(ids, "a b")


def test_returning_rater_resumes_at_first_unanswered_task(folder: Path, db: Path) -> None:
    order = study.task_order(list(_tasks(folder)["task_id"]), "alice", seed=3)
    first = study.create_app(folder, db, seed=3).test_client()
    for k in range(3):
        task_id, _ = _shown_task(first, "alice")
        assert task_id == order[k]
        assert _post(first, {"rater": "alice", "task_id": task_id, "choice": "left"})[0] == 200
    # a new server process on the same database: the rater comes back from the start page
    again = study.create_app(folder, db, seed=3).test_client()
    start = again.get("/start?rater=alice")
    assert start.status_code == 302 and "/r/alice/task" in start.location
    html = again.get(start.location).get_data(as_text=True)
    assert "Task 4 of 8" in html and "Welcome back" in html
    assert re.search(r'data-task-id="([^"]+)"', html).group(1) == order[3]
    # an answer out of order (the API allows any task) is skipped over when resuming
    assert _post(again, {"rater": "alice", "task_id": order[4], "choice": "right"})[0] == 200
    assert _shown_task(again, "alice")[0] == order[3]
    assert again.get("/api/progress?rater=alice").get_json()["answered"] == 4


# ---- timing ---------------------------------------------------------------------------------

def test_seconds_run_from_serving_the_page_to_the_answer(client, folder: Path, db: Path,
                                                         monkeypatch) -> None:
    clock = [1_000.0]
    monkeypatch.setattr(study, "_now", lambda: clock[0])
    task_id, _ = _shown_task(client, "alice")
    clock[0] = 1_004.0
    task_id_again, _ = _shown_task(client, "alice")  # a reload restarts the clock
    assert task_id_again == task_id
    clock[0] = 1_011.5
    assert _post(client, {"rater": "alice", "task_id": task_id, "choice": "decline"})[0] == 200
    (row,) = _rows(db)
    assert row[4] == pytest.approx(7.5, abs=1e-9)
    assert row[5] == "1970-01-01T00:16:51.500+00:00"
    # an answer to a task whose page was never served has no time
    other = next(t for t in _tasks(folder)["task_id"] if t != task_id)
    assert _post(client, {"rater": "alice", "task_id": other, "choice": "left"})[0] == 200
    assert [r[4] for r in _rows(db) if r[1] == other] == [None]



# ---- export ---------------------------------------------------------------------------------

def test_export_joins_tasks_and_marks_correct_answers(client, folder: Path, db: Path,
                                                      tmp_path: Path) -> None:
    tasks = _tasks(folder).set_index("task_id")
    given = {("alice", "t0001"): "left", ("alice", "t0003"): "left", ("alice", "t0005"): "decline",
             ("bob", "t0008"): "left", ("bob", "t0002"): "right"}
    for (rater, task_id), choice in given.items():
        _shown_task(client, rater)
        assert _post(client, {"rater": rater, "task_id": task_id, "choice": choice})[0] == 200
    out = tmp_path / "export" / "answers.csv"
    study.main(["export", "--tasks", str(folder), "--db", str(db), "--out", str(out)])
    csv = pd.read_csv(out)
    assert list(csv.columns) == list(study.EXPORT_COLUMNS)
    assert len(csv) == len(given)
    for row in csv.itertuples(index=False):
        task = tasks.loc[row.task_id]
        assert row.choice == given[(row.rater, row.task_id)]
        assert (row.sample, row.neuron_kind, row.visualization, row.neuron, row.correct_side) == (
            task["sample"], task["neuron_kind"], task["visualization"], task["neuron"],
            task["correct_side"])
        assert row.correct == (row.choice == task["correct_side"])
    # t0001 is left (right), t0003 is right (wrong), a decline is never correct
    assert csv.set_index("task_id").loc[["t0001", "t0003", "t0005", "t0008", "t0002"],
                                        "correct"].tolist() == [True, False, False, True, False]
    assert csv["correct"].dtype == bool
    table = study.read_answers(db, folder)
    assert list(table.columns) == list(study.EXPORT_COLUMNS)
    assert table["seconds"].dtype == "float64" and table["sample"].dtype == "int64"
    assert table["rater"].tolist() == sorted(table["rater"])
    pd.testing.assert_frame_equal(table.reset_index(drop=True),
                                  csv.astype({"seconds": "float64"}), check_dtype=False)


def test_export_of_no_answers_is_an_empty_table(folder: Path, db: Path, tmp_path: Path) -> None:
    study.create_app(folder, db)
    out = tmp_path / "empty.csv"
    study.main(["export", "--tasks", str(folder), "--db", str(db), "--out", str(out)])
    assert out.read_text().strip() == ",".join(study.EXPORT_COLUMNS)
    assert study.read_answers(db, folder).empty


def test_read_answers_refuses_a_rebuilt_folder(client, folder: Path, db: Path,
                                               tmp_path: Path) -> None:
    assert _post(client, {"rater": "alice", "task_id": "t0004", "choice": "left"})[0] == 200
    with pytest.raises(FileNotFoundError, match="does not exist"):
        study.read_answers(tmp_path / "none.sqlite", folder)
    rebuilt = shutil.copytree(folder, tmp_path / "rebuilt")
    frame = pd.read_csv(rebuilt / "tasks.csv")
    frame.loc[frame["task_id"] == "t0004", "correct_side"] = "left"
    frame.to_csv(rebuilt / "tasks.csv", index=False)
    with pytest.raises(ValueError, match="another correct side .* t0004"):
        study.read_answers(db, rebuilt)
    for kind in study.IMAGE_KINDS:
        (rebuilt / "images" / f"t0004-{kind}.png").rename(rebuilt / "images" / f"t0009-{kind}.png")
    frame.loc[frame["task_id"] == "t0004", "task_id"] = "t0009"
    frame.to_csv(rebuilt / "tasks.csv", index=False)
    with pytest.raises(ValueError, match="missing from .*: t0004"):
        study.read_answers(db, rebuilt)


def test_database_with_other_answers_table_is_refused(folder: Path, db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE answers(rater TEXT, task TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="columns \\['rater', 'task'\\]"):
        study.create_app(folder, db)


def test_bad_seed_is_refused(folder: Path, db: Path) -> None:
    with pytest.raises(ValueError, match="seed must be an integer, got 0.5"):
        study.create_app(folder, db, seed=0.5)


# ---- command line ---------------------------------------------------------------------------

def test_serve_binds_loopback_and_builds_tasks_when_not_given(folder: Path, monkeypatch) -> None:
    served = []
    monkeypatch.setattr(study, "_run_server", lambda app, host, port: served.append(
        (app, host, port)))
    built = []
    fake = types.ModuleType("spade_lib.study_tasks")
    fake.build_tasks = lambda cfg: built.append(cfg.name) or folder
    monkeypatch.setitem(sys.modules, "spade_lib.study_tasks", fake)
    study.main(["serve", "--preset", "smoke", "--port", "0"])
    assert built == ["smoke"]
    ((app, host, port),) = served
    assert (host, port) == ("127.0.0.1", 0)
    assert app.config["STUDY_DB"] == (folder / "answers.sqlite").resolve()
    study.main(["serve", "--tasks", str(folder), "--db", str(folder.parent / "x.sqlite")])
    assert built == ["smoke"] and served[1][2] == 8765
    assert served[1][0].config["STUDY_DB"] == (folder.parent / "x.sqlite").resolve()


@pytest.mark.parametrize("argv", [["serve", "--port", "70000"], ["serve", "--port", "x"],
                                  ["export", "--tasks", "."], ["dance"]])
def test_bad_command_lines_are_refused(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        study.main(argv)
    assert exc.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_seconds_value_is_finite(client, db: Path) -> None:
    task_id, _ = _shown_task(client, "zoe")
    assert _post(client, {"rater": "zoe", "task_id": task_id, "choice": "right"})[0] == 200
    seconds = _rows(db)[0][4]
    assert math.isfinite(seconds) and seconds >= 0
