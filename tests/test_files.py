"""The shared file mechanisms (axolotl_focus.files): the UTF-8 reader, the run-identity rule and the
exclusive lock every writer takes."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from axolotl_focus.files import exclusive_lock, input_identity, other_job, read_lines, read_text

HOLD = textwrap.dedent("""
    import sys, time
    from axolotl_focus.files import exclusive_lock
    with exclusive_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_read_text_names_file_line_and_byte(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbfline one\nline two caf\xe9\n")
    with pytest.raises(ValueError) as err:
        read_text(path, "prompts")
    assert str(err.value) == (f"prompts: {path}:2: not UTF-8 text (byte 0xe9 at column 13); save the file as UTF-8")
    path.write_bytes(b"\xef\xbb\xbfline one\n")
    assert read_lines(path) == ["line one", ""]  # the BOM dropped


def test_the_run_identity_is_the_content_not_the_path(tmp_path):
    a, b = tmp_path / "A.jsonl", tmp_path / "B.jsonl"
    a.write_text('{"text": "x"}\n')
    b.write_text('{"text": "y"}\n')
    moved = tmp_path / "moved" / "A.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(a.read_bytes())
    assert input_identity(a) == input_identity(moved) != input_identity(b)
    assert input_identity("org/dataset") == "name:org/dataset" and input_identity(None) is None
    other_job("out", {"prompts": input_identity(a), "seed": 0}, {"prompts": input_identity(moved), "seed": 0})
    other_job("out", {"seed": 0}, {"prompts": input_identity(b), "seed": 0})  # a key the old record lacks: not compared
    with pytest.raises(ValueError) as err:
        other_job("out", {"prompts": input_identity(a), "seed": 0}, {"prompts": input_identity(b), "seed": 0},
                  field="output")
    assert str(err.value) == (f"output: out was made with prompts={input_identity(a)} (now prompts="
                              f"{input_identity(b)}): another job; rerun with --restart to start it over, or pick "
                              "another --output")


def _holder(target):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    target = tmp_path / "pairs.jsonl"
    proc = _holder(target)
    try:
        with pytest.raises(ValueError) as err:
            with exclusive_lock(target):
                pass
        assert str(err.value) == (f"{target}: another process (PID {proc.pid}) is writing it (lock {target}.lock); "
                                  "wait for it to finish, or pick another --output")
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_killed_process_is_recovered(tmp_path):
    target = tmp_path / "cache"
    proc = _holder(target)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "cache.lock").read_text().strip() == str(proc.pid)  # left behind by kill -9
    with exclusive_lock(target):
        assert (tmp_path / "cache.lock").read_text().strip() == str(os.getpid())
        with exclusive_lock(target):  # taken again by its holder: a no-op
            pass
        assert (tmp_path / "cache.lock").exists()
    assert not (tmp_path / "cache.lock").exists()  # released: removed


def test_the_lock_is_released_on_an_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with exclusive_lock(target):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    start = time.monotonic()
    with exclusive_lock(target):
        pass
    assert time.monotonic() - start < 1
