"""RunOutput: a run's files are one unit (nothing lost, nothing mixed), under an exclusive lock, and
run_cli turns every failure into one line."""

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sae_core
from sae_core import RUN_DIR, HusaiError, RunOutput, WriteError, run_cli

REPO = Path(__file__).resolve().parent.parent


def write_run(folder: Path, run: str, contents: dict[str, object], force: bool = False,
              entries: list[str] | None = None) -> None:
    """Commit a run whose entries hold `contents`: a string is a file, a dict a folder of files."""
    with RunOutput(folder, run, entries or list(contents), force) as out:
        for entry, content in contents.items():
            if isinstance(content, dict):
                out.path(entry).mkdir()
                for name, text in content.items():
                    (out.path(entry) / name).write_text(text)
            else:
                out.path(entry).write_text(content)
        out.commit()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (its bookkeeping folder aside) and its text."""
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and RUN_DIR not in p.relative_to(folder).parts}


def leftovers(folder: Path) -> list[str]:
    """Anything in the bookkeeping folder besides the lock and the manifests: staging, journals, trash,
    temporary files; and probe files in the folder itself."""
    meta = folder / RUN_DIR
    allowed = {meta / "lock", meta / "runs", *(meta / "runs").glob("*.json")}
    stray = [p for p in meta.rglob("*") if p not in allowed] + list(folder.glob(".husai-probe-*"))
    return sorted(str(p.relative_to(folder)) for p in stray)


def manifest(folder: Path, run: str) -> dict:
    return json.loads((folder / RUN_DIR / "runs" / f"{run}.json").read_text())


OLD = {"a.bin": "old a", "a.log": "old log", "a.ckpt": {"e0": "old 0", "e10": "old 10", "e20": "old 20"}}
NEW = {"a.bin": "new a", "a.log": "new log", "a.ckpt": {"e0": "new 0"}}


def test_a_forced_rerun_replaces_the_run_whole_and_only_the_run(tmp_path):
    write_run(tmp_path, "a", OLD)
    write_run(tmp_path, "b", {"b.bin": "b"})
    (tmp_path / "notes.txt").write_text("the user's own file")
    assert manifest(tmp_path, "a")["entries"] == ["a.bin", "a.log", "a.ckpt"]
    with pytest.raises(HusaiError, match=r"a.bin already exists \(and 2 more.*--force"):
        write_run(tmp_path, "a", NEW)
    # The new run writes fewer checkpoints and no log: none of the old ones may survive beside it.
    write_run(tmp_path, "a", {"a.bin": "new a", "a.ckpt": {"e0": "new 0"}}, force=True, entries=list(NEW))
    assert snapshot(tmp_path) == {"a.bin": "new a", "a.ckpt/e0": "new 0", "b.bin": "b",
                                  "notes.txt": "the user's own file"}
    assert manifest(tmp_path, "a")["entries"] == ["a.bin", "a.ckpt"]
    assert leftovers(tmp_path) == []


def test_force_never_touches_another_runs_files(tmp_path):
    write_run(tmp_path, "first", {"first.bin": "1", "shared.log": "first's log"})
    with pytest.raises(HusaiError, match="shared.log belongs to another run, 'first'"):
        write_run(tmp_path, "second", {"second.bin": "2", "shared.log": "second's log"}, force=True)
    assert snapshot(tmp_path) == {"first.bin": "1", "shared.log": "first's log"}
    assert leftovers(tmp_path) == []


def test_an_earlier_run_of_the_same_name_needs_force_even_if_its_files_differ(tmp_path):
    write_run(tmp_path, "a", {"a.v1": "1"})
    with pytest.raises(HusaiError, match="run 'a' already exists.*a.v1.*--force"):
        write_run(tmp_path, "a", {"a.v2": "2"})
    write_run(tmp_path, "a", {"a.v2": "2"}, force=True)
    assert snapshot(tmp_path) == {"a.v2": "2"}


def test_raising_inside_the_writer_after_the_first_file_leaves_the_old_run_intact(tmp_path):
    write_run(tmp_path, "a", OLD)
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="writer failed"):
        with RunOutput(tmp_path, "a", list(NEW), force=True) as out:
            out.path("a.bin").write_text("new a")
            raise RuntimeError("writer failed")
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []
    assert out.describe_state() == f"run 'a' was not committed; nothing in {tmp_path} was changed"


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_a_killed_run_leaves_the_old_run_and_its_staging_is_cleared_next_time(tmp_path):
    write_run(tmp_path, "a", OLD)
    before = snapshot(tmp_path)
    killed = run_python("""
        import os
        from sae_core import RunOutput
        with RunOutput(".", "a", ["a.bin", "a.log", "a.ckpt"], force=True) as out:
            out.path("a.bin").write_text("new a")
            os._exit(9)                     # killed: no cleanup runs
    """, cwd=tmp_path)
    assert killed.returncode == 9
    assert snapshot(tmp_path) == before
    assert any(name.startswith(f"{RUN_DIR}/staging-a-") for name in leftovers(tmp_path))
    write_run(tmp_path, "c", {"c.bin": "c"})                 # the next run on the folder clears it
    assert leftovers(tmp_path) == [] and snapshot(tmp_path) == dict(before, **{"c.bin": "c"})


def test_a_run_killed_during_its_renames_is_completed_by_the_next_run(tmp_path):
    write_run(tmp_path, "a", OLD)
    killed = run_python("""
        import os
        import sae_core
        from sae_core import RunOutput
        calls, replace = [], os.replace
        def replace_then_die(source, target):     # the journal's own rename, then the first entry, then death
            calls.append(target)
            if len(calls) == 3:
                os._exit(9)
            replace(source, target)
        with RunOutput(".", "a", ["a.bin", "a.log", "a.ckpt"], force=True) as out:
            out.path("a.bin").write_text("new a")
            out.path("a.log").write_text("new log")
            out.path("a.ckpt").mkdir()
            (out.path("a.ckpt") / "e0").write_text("new 0")
            sae_core.os.replace = replace_then_die
            out.commit()
    """, cwd=tmp_path)
    assert killed.returncode == 9, killed.stderr
    assert snapshot(tmp_path)["a.bin"] == "new a" and snapshot(tmp_path)["a.log"] == "old log"   # a mix, for now
    assert (tmp_path / RUN_DIR / "journal-a.json").is_file()
    write_run(tmp_path, "c", {"c.bin": "c"})
    assert snapshot(tmp_path) == {"a.bin": "new a", "a.log": "new log", "a.ckpt/e0": "new 0", "c.bin": "c"}
    assert leftovers(tmp_path) == []


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(tmp_path):
    with RunOutput(tmp_path, "a", ["a.bin"], force=False):
        with pytest.raises(HusaiError, match=rf"in use by another run \(pid {os.getpid()}, started .*: `.*`\)"):
            with RunOutput(tmp_path, "b", ["b.bin"], force=False):
                pass
    write_run(tmp_path, "b", {"b.bin": "b"})               # free again once the first has left


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    write_run(tmp_path, "a", {"a.bin": "old"})
    before = snapshot(tmp_path)
    real_write = Path.write_bytes

    def disk_full(self, data):
        if self.name.startswith(".a.bin"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)
    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(WriteError, match=f"cannot write {tmp_path}/a.bin: No space left on device; run 'a' "
                                         f"was not committed and {tmp_path} is unchanged"):
        with RunOutput(tmp_path, "a", ["a.bin"], force=True) as out:
            sae_core.save_tensors(out.path("a.bin"), {}, "test", 1, {})
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("failing_write,message", [
    (1, "was not committed and {folder} is unchanged"),                   # the journal: before the commit
    (2, "failed .*; the next run on {folder} completes it"),              # the manifest: after the renames
])
def test_a_full_disk_during_the_commit_leaves_the_old_run_or_a_commit_the_next_run_finishes(
        tmp_path, monkeypatch, failing_write, message):
    write_run(tmp_path, "a", OLD)
    before = snapshot(tmp_path)
    calls, real_write = [], sae_core.write_json_durably

    def full_at(path, value):
        calls.append(path)
        if len(calls) == failing_write:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, value)
    monkeypatch.setattr(sae_core, "write_json_durably", full_at)
    with pytest.raises(WriteError, match=message.format(folder=tmp_path)):
        write_run(tmp_path, "a", NEW, force=True)
    monkeypatch.setattr(sae_core, "write_json_durably", real_write)
    if failing_write == 1:
        assert snapshot(tmp_path) == before and leftovers(tmp_path) == []
    else:
        write_run(tmp_path, "c", {"c.bin": "c"})
        assert snapshot(tmp_path) == {"a.bin": "new a", "a.log": "new log", "a.ckpt/e0": "new 0", "c.bin": "c"}
        assert manifest(tmp_path, "a")["entries"] == ["a.bin", "a.log", "a.ckpt"] and leftovers(tmp_path) == []


def test_entry_names_that_would_leave_the_folder_are_refused(tmp_path):
    for bad in ["../escape", "a/b", "..", RUN_DIR, ""]:
        with pytest.raises(HusaiError, match="cannot name an output"):
            RunOutput(tmp_path, "a", [bad], force=True)


# ---- run_cli ---------------------------------------------------------------------------------------


def exit_of(main, capsys, unit_outputs=True) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as stop:
        run_cli(main, unit_outputs=unit_outputs)
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


def test_run_cli_gives_one_line_for_os_errors_and_a_true_interruption_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sae_core, "ENTERED_RUNS", [])

    def unreadable():
        open(tmp_path / "missing.txt")
    assert exit_of(unreadable, capsys) == (1, [f"error: {tmp_path}/missing.txt: No such file or directory"])

    def interrupted_before_output():
        raise KeyboardInterrupt
    assert exit_of(interrupted_before_output, capsys) == (130, ["interrupted: stopped before any output was written"])
    code, lines = exit_of(interrupted_before_output, capsys, unit_outputs=False)
    assert code == 130 and "may hold files of this run beside files of an earlier one" in lines[0]

    def interrupted_while_writing():
        with RunOutput(tmp_path, "a", ["a.bin"], force=False) as out:
            out.path("a.bin").write_text("partial")
            raise KeyboardInterrupt
    assert exit_of(interrupted_while_writing, capsys) == (
        130, [f"interrupted: run 'a' was not committed; nothing in {tmp_path} was changed"])
    assert snapshot(tmp_path) == {} and leftovers(tmp_path) == []

    def interrupted_after_commit():
        write_run(tmp_path, "a", {"a.bin": "done"})
        raise KeyboardInterrupt
    assert exit_of(interrupted_after_commit, capsys) == (
        130, [f"interrupted: run 'a' had already been committed whole to {tmp_path}"])
