"""Output directories: a run writes a new directory or replaces an earlier mechlens run, and nothing else
(mechlens.outputs)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest

from mechlens.errors import OutputError
from mechlens.outputs import MARKER, Destination, prepare_output


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
        "state": "done",
        "files": {f: hashlib.sha256(f.encode()).hexdigest() for f in ("report.html", "results.json")},
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


@pytest.mark.parametrize("edit", ["append", "truncate", "same-size", "replace-with-dir"])
def test_an_earlier_run_with_an_edited_file_is_refused_and_kept(tmp_path, edit):
    out = tmp_path / "run"
    _write(prepare_output(out), ("report.html", "results.json"))
    target = out / "report.html"
    if edit == "append":
        target.write_text(target.read_text() + "<p>my notes</p>")
    elif edit == "truncate":
        target.write_text("")
    elif edit == "same-size":
        target.write_text("REPORT.HTML"[: len("report.html")])
    else:
        target.unlink()
        target.mkdir()
        (target / "mine.txt").write_text("mine")
    before = {p.relative_to(out).as_posix(): (p.read_bytes() if p.is_file() else None) for p in out.rglob("*")}
    with pytest.raises(OutputError, match=r"'report\.html'"):
        prepare_output(out)
    after = {p.relative_to(out).as_posix(): (p.read_bytes() if p.is_file() else None) for p in out.rglob("*")}
    assert after == before


def test_a_deleted_file_does_not_block_and_an_old_style_marker_is_refused(tmp_path):
    out = tmp_path / "run"
    _write(prepare_output(out), ("report.html", "results.json"))
    (out / "report.html").unlink()  # nothing of the user's is lost by replacing what remains
    _write(prepare_output(out), ("results.json",))
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_text("x")
    (old / MARKER).write_text(json.dumps({"written_by": "mechlens", "files": ["results.json"]}))
    with pytest.raises(OutputError, match=r"'results\.json'"):  # names only: an edit could not be seen
        prepare_output(old)


def test_an_edit_after_the_first_check_of_commit_is_caught_and_put_back(tmp_path, monkeypatch):
    from mechlens import outputs

    out = tmp_path / "run"
    _write(prepare_output(out), ("report.html",))
    dest = prepare_output(out)
    (dest.tmp / "results.json").write_text("new")
    real = outputs._check_replaceable
    calls = []

    def edit_in_the_window(path, shown):
        calls.append(path)
        real(path, shown)
        if len(calls) == 1:  # between the check of `out` and its rename: the user edits the report
            (path / "report.html").write_text("edited in the window")

    monkeypatch.setattr(outputs, "_check_replaceable", edit_in_the_window)
    with pytest.raises(OutputError, match="edited"):
        dest.commit()
    assert (out / "report.html").read_text() == "edited in the window"  # put back where it was
    dest.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_stale_temporaries_with_mechlens_marker_are_removed_and_nothing_else(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    stale = prepare_output(tmp_path / "a")  # a temporary directory left as SIGKILL leaves it
    (stale.tmp / "results.json").write_text("partial")
    doc = json.loads((stale.tmp / MARKER).read_text())
    (stale.tmp / MARKER).write_text(json.dumps(doc | {"pid": dead_pid}))
    alive = prepare_output(tmp_path / "b")  # a run still going (this process): kept
    foreign = tmp_path / ".c.tmp-mine"  # same name pattern, no marker: someone else's
    foreign.mkdir()
    (foreign / "data.txt").write_text("mine")
    forged = tmp_path / ".d.tmp-x"  # a marker of a finished run, not a partial one: not a temporary
    forged.mkdir()
    (forged / MARKER).write_text(json.dumps({"written_by": "mechlens", "state": "done", "files": {}}))
    _write(prepare_output(tmp_path / "e"))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert stale.tmp.name not in names
    assert alive.tmp.name in names and ".c.tmp-mine" in names and ".d.tmp-x" in names and "e" in names
    assert isinstance(alive, Destination)
    alive.abort()


_SLOW_RUN = """
import sys, time
from mechlens import cli, outputs
real = outputs.Destination.writing
def slow(self):
    print("TMP", self.tmp, flush=True)
    time.sleep(60)
    return real(self)
outputs.Destination.writing = slow
sys.exit(cli.main(["run", "logits", "--n-samples", "10", "--n-new-tokens", "2", "--quiet", "--out", sys.argv[1]]))
"""


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_end_a_run_with_one_line_and_nothing_beside_out(tmp_path, sig, code):
    out = tmp_path / "new" / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)  # fmt: skip
    line = p.stdout.readline()  # the run is computing into its temporary directory
    assert line.startswith("TMP"), (line, p.stderr.read())
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == code, err
    assert len(lines) == 1 and lines[0].startswith("mechlens: error: interrupted by " + sig.name), err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no temporary, and the parents it made are gone
