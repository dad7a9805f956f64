"""Output directories: a run writes a new directory or replaces an earlier mechlens run, and nothing else
(mechlens.outputs)."""

from __future__ import annotations

import json
import os

import pytest

from mechlens.errors import OutputError
from mechlens.outputs import MARKER, prepare_output


def _write(dest, files=("results.json",)):
    with dest.writing() as tmp:
        for f in files:
            (tmp / f).write_text(f)


def test_new_directory_gets_the_files_and_a_marker_listing_them(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    _write(prepare_output(out), ("results.json", "report.html"))
    assert sorted(os.listdir(out)) == sorted([MARKER, "results.json", "report.html"])
    assert json.loads((out / MARKER).read_text()) == {
        "written_by": "mechlens",
        "files": ["report.html", "results.json"],
    }
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary leftovers


def test_an_earlier_run_is_replaced_and_an_empty_directory_used(tmp_path):
    out = tmp_path / "run"
    _write(prepare_output(out), ("old.csv", "results.json"))
    _write(prepare_output(out), ("results.json",))
    assert sorted(os.listdir(out)) == [MARKER, "results.json"]  # old.csv was mechlens' own: gone
    empty = tmp_path / "empty"
    empty.mkdir()
    _write(prepare_output(empty))
    assert (empty / "results.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "run"]


@pytest.mark.parametrize("extra", ["thesis.txt", "sub/thesis.txt", "subdir/"])
def test_an_earlier_run_with_a_users_file_is_refused(tmp_path, extra):
    out = tmp_path / "run"
    _write(prepare_output(out))
    target = out / extra
    if extra.endswith("/"):
        target.mkdir()
    else:
        target.parent.mkdir(exist_ok=True)
        target.write_text("mine")
    with pytest.raises(OutputError, match="mechlens did not write"):
        prepare_output(out)
    assert target.exists()


def test_a_forged_or_broken_marker_does_not_make_a_directory_replaceable(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "data.csv").write_text("mine")
    for marker in ("not json", json.dumps({"written_by": "someone", "files": ["data.csv"]})):
        (out / MARKER).write_text(marker)
        with pytest.raises(OutputError):
            prepare_output(out)
    assert (out / "data.csv").read_text() == "mine"


def test_symlink_file_cwd_and_parents_are_refused(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("x")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    for out, msg in [(tmp_path / "link", "symbolic link"), (tmp_path / "file", "existing file"),
                     (".", "current directory"), ("..", "current directory")]:  # fmt: skip
        with pytest.raises(OutputError, match=msg):
            prepare_output(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "file", "link", "real"]


def test_inputs_of_compare_are_refused(tmp_path):
    inp = tmp_path / "in"
    _write(prepare_output(inp))
    for out in (inp, inp / "x", tmp_path):
        with pytest.raises(OutputError, match="input"):
            prepare_output(out, inputs=[inp])


def test_abort_removes_the_temporary_and_the_parents_it_made(tmp_path):
    dest = prepare_output(tmp_path / "new" / "deeper" / "run")
    assert dest.tmp.is_dir()
    with pytest.raises(RuntimeError), dest.writing() as tmp:
        (tmp / "results.json").write_text("{}")
        raise RuntimeError("a study failed")
    assert list(tmp_path.iterdir()) == []


def test_a_destination_that_changed_during_the_run_is_not_replaced(tmp_path):
    out = tmp_path / "run"
    dest = prepare_output(out)  # absent when checked
    out.mkdir()
    (out / "arrived-meanwhile.txt").write_text("mine")
    with pytest.raises(OutputError, match="mechlens did not write"):
        _write(dest)
    assert sorted(os.listdir(out)) == ["arrived-meanwhile.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
