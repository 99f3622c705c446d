"""Signals, a full disk and concurrent publishing leave nothing behind and end in one line.

- SIGTERM (``kill``, ``timeout``, systemd, ``docker stop``) takes Ctrl-C's path: exit 143, no
  ``.OUT.staging-*`` / ``.OUT.fp32-*`` directory, no model-builder process; SIGKILL of the build
  still takes the builder down (PR_SET_PDEATHSIG).
- A build into a full filesystem (a small tmpfs in a private mount namespace) ends in
  "no space left on device writing OUT", whichever write fails: the vision export, INT8's short
  write read back as a protobuf DecodeError, the language model's copy or its builder.
- Processes meeting at a barrier publish into one directory at the same moment: each one
  succeeds or gets a clear ``BundleError``, and no staging directory or lock file is left.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ccra_export.core import atomic
from ccra_export.core.atomic import NoSpaceError, scratch_directory, staged_directory, write_json
from ccra_export.core.errors import BundleError, CheckpointError, ConfigError

BUILDER = "onnxruntime_genai.models.builder"


def _leftovers(parent: Path, name: str = "out") -> list[str]:
    """What a build into ``parent/name`` left beside it: staging, scratch, old copies, the lock."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ---------------------------------------------------------------- the publish race


def _publisher(parent: str, replace: bool, rounds: int, barrier, results, worker: int) -> None:
    """One process: every round, stage a two-file bundle, meet the others, publish at once."""
    mine = []
    for index in range(rounds):
        final = Path(parent) / f"round{index}" / "out"
        try:
            barrier.wait(timeout=60)
            with staged_directory(final, replace=replace) as stage:
                (stage / "a").write_text(str(worker))
                (stage / "b").write_text(str(worker))
                barrier.wait(timeout=60)  # everyone's stage is complete: publish together
            mine.append("ok")
        except BundleError as exc:
            mine.append(f"refused: {exc}")
        except BaseException as exc:  # reported to the parent, which fails the test
            mine.append(f"error: {type(exc).__name__}: {exc}")
    results.put((worker, mine))


@pytest.mark.parametrize("replace", [False, True], ids=["no-force", "force"])
def test_concurrent_publish_is_serialised(tmp_path, replace):
    workers, rounds = 4, 15
    for index in range(rounds):
        (tmp_path / f"round{index}").mkdir()
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(workers), context.Queue()
    processes = [
        context.Process(target=_publisher, args=(str(tmp_path), replace, rounds, barrier, results, worker))
        for worker in range(workers)
    ]
    for process in processes:
        process.start()
    outcomes = dict(results.get(timeout=240) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    for index in range(rounds):
        got = [outcomes[worker][index] for worker in range(workers)]
        assert not [g for g in got if g.startswith("error")], got
        ok = got.count("ok")
        if replace:
            assert ok == workers, got  # each replaced the previous one in turn
        else:
            assert ok == 1, got  # the first one published; the others are refused in one line
            assert all("already holds files" in g and "pass force to replace" in g for g in got if g != "ok"), got
        final = tmp_path / f"round{index}" / "out"
        assert (final / "a").read_text() == (final / "b").read_text()  # one writer's complete bundle
        assert sorted(p.name for p in final.parent.iterdir()) == ["out"]  # no staging, old copy or lock


def test_publish_lock_is_exclusive_and_removed(tmp_path):
    final = tmp_path / "out"
    with atomic.publish_lock(final):
        assert (tmp_path / ".out.lock").exists()
    assert not (tmp_path / ".out.lock").exists()


# ---------------------------------------------------------------- SIGTERM in process


def test_sigterm_takes_the_ctrl_c_path_and_cleans_up(tmp_path):
    from ccra_export.cli.output import Terminated, terminate_like_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as caught, terminate_like_interrupt():
        with staged_directory(tmp_path / "out", replace=False) as stage, scratch_directory(tmp_path / "out") as scratch:
            (stage / "vision.onnx").write_bytes(b"x" * 1000)
            (scratch / "vision.onnx").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here, at once
    assert isinstance(caught.value, KeyboardInterrupt) and caught.value.signum == signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # restored after the command


def test_an_ignored_sigterm_stays_ignored(tmp_path):
    from ccra_export.cli.output import terminate_like_interrupt

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as nohup / a supervisor may set it
    try:
        with terminate_like_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_reports_errors_exits_128_plus_the_signal(capsys):
    from ccra_export.cli.output import reports_errors, terminate_like_interrupt

    @reports_errors
    def command() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    with pytest.raises(SystemExit) as exited, terminate_like_interrupt():
        command()
    assert exited.value.code == 143
    assert capsys.readouterr().err.strip() == "terminated (SIGTERM): nothing was written"


# ---------------------------------------------------------------- SIGTERM / SIGKILL of a real build


def _children(pid: int) -> dict[int, str]:
    """``{pid: command line}`` of ``pid``'s direct children, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that is not us counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _build_until_builder_runs(ccra_checkpoint: Path, cwd: Path) -> tuple[subprocess.Popen, int]:
    """Start a real LM build in ``cwd`` and return once its model-builder subprocess runs."""
    command = [sys.executable, "-m", "ccra_export.cli", "build", "--model", str(ccra_checkpoint)]
    command += ["--precision", "fp32", "--lm-precision", "int4", "-o", "out"]
    build = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and build.poll() is None:
        builders = [pid for pid, cmd in _children(build.pid).items() if BUILDER in cmd]
        if builders:
            return build, builders[0]
        time.sleep(0.1)
    build.kill()
    _, err = build.communicate()
    pytest.fail(f"the build never started the model builder (exit {build.returncode}): {err[-2000:]}")


def _wait_dead(pid: int, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_mid_build_cleans_up_and_stops_the_builder(tmp_path, ccra_checkpoint):
    build, builder = _build_until_builder_runs(ccra_checkpoint, tmp_path)
    staged = _leftovers(tmp_path)
    assert any(".staging-" in n for n in staged) and any(".fp32-" in n for n in staged), staged  # mid-build
    build.send_signal(signal.SIGTERM)
    _, err = build.communicate(timeout=120)
    assert build.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "terminated (SIGTERM): nothing was written"
    assert _wait_dead(builder), f"model builder {builder} outlived the build"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no staging, scratch, bundle or ./cache_dir


@pytest.mark.slow  # 13 s; the default run's SIGTERM test stops the builder through the same finally
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkill_of_the_build_takes_the_builder_down(tmp_path, ccra_checkpoint):
    build, builder = _build_until_builder_runs(ccra_checkpoint, tmp_path)
    build.kill()  # no handler runs: only the kernel's parent-death signal can stop the builder
    build.communicate(timeout=60)
    assert _wait_dead(builder), f"model builder {builder} outlived a SIGKILLed build"


# ---------------------------------------------------------------- a full disk


def test_no_space_is_recognised_in_every_wrapper(tmp_path, monkeypatch):
    from google.protobuf.message import DecodeError

    assert atomic.says_no_space(OSError(errno.ENOSPC, "No space left on device"))
    assert atomic.says_no_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    # safetensors' Rust io::Error and the model builder's last stderr line, as they really read
    assert atomic.says_no_space(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert atomic.says_no_space(CheckpointError("onnxruntime-genai model builder failed: OSError: [Errno 28] No spa"))
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as exc:
        assert atomic.says_no_space(exc)
    assert not atomic.says_no_space(OSError(errno.EACCES, "Permission denied"))

    # a short write read back (no errno): a full filesystem at the time of the failure decides
    monkeypatch.setattr(atomic, "nearly_full", lambda path: True)
    with pytest.raises(NoSpaceError, match=r"^no space left on device writing .*out"):
        with staged_directory(tmp_path / "out", replace=False), scratch_directory(tmp_path / "out"):
            raise DecodeError("Error parsing message with type 'onnx.ModelProto'")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError):  # a user-facing error keeps its own message
        with staged_directory(tmp_path / "out", replace=False):
            raise ConfigError("--opset 5: expected 17 or later")
    with pytest.raises(KeyboardInterrupt):  # an interrupt is never a full disk
        with staged_directory(tmp_path / "out", replace=False):
            raise KeyboardInterrupt
    with pytest.raises(RuntimeError), staged_directory(tmp_path / "out", replace=False):
        raise RuntimeError("a bug")  # not a file read back: stays what it is, full disk or not

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.json, "dump", full)
    with pytest.raises(NoSpaceError, match=r"writing .*x\.json"):
        write_json(tmp_path / "x.json", {"a": 1})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # no .x.json.*.tmp either
    with pytest.raises(DecodeError), staged_directory(tmp_path / "out", replace=False):
        raise DecodeError("corrupt")  # with space left, a decode error stays what it is


def test_no_space_is_read_from_errno_numbers_and_real_classes(tmp_path, monkeypatch):
    """Only ENOSPC/EDQUOT's numbers count, as Python and Rust print them; a read-back failure is
    the library's own class, not one that shares its name."""
    rust_debug = f'IoError(Os {{ code: {errno.EDQUOT}, kind: QuotaExceeded, message: "Disk quota exceeded" }})'
    assert atomic.says_no_space(Exception(f"Error while serializing: {rust_debug}"))  # older safetensors
    assert not atomic.says_no_space(Exception(f"[Errno {errno.EACCES}] Permission denied: 'out'"))
    assert not atomic.says_no_space(Exception(f"I/O error: Permission denied (os error {errno.EACCES})"))

    monkeypatch.setattr(atomic, "nearly_full", lambda path: True)
    lookalike = type("DecodeError", (Exception,), {})
    with pytest.raises(lookalike), staged_directory(tmp_path / "out", replace=False):
        raise lookalike("not protobuf's")
    assert list(tmp_path.iterdir()) == []


def _namespace_prefix() -> list[str] | None:
    """``unshare`` into a private mount namespace (root), or a user+mount namespace (others)."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory) -> Path:
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (80 + 8 * i, 96, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tmpfs in a mount namespace is Linux's")
@pytest.mark.parametrize(
    ("size", "args"),
    [
        ("300k", ["--precision", "fp32"]),  # the vision graph does not fit
        ("1000k", ["--precision", "int8", "--calib-data", "{calib}"]),  # ONNX's unchecked C++ write, then DecodeError
        pytest.param(  # the language model's copy / its builder (20 s: the default run keeps the other two)
            "1700k", ["--precision", "fp32", "--lm-precision", "int4"], marks=pytest.mark.slow
        ),
    ],
    ids=["vision", "int8-short-write", "language-model"],
)
def test_build_into_a_full_disk_ends_in_one_line(tmp_path, ccra_checkpoint, calib_dir, size, args):
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (no unshare, or no mount namespace for this user)")
    disk = tmp_path / "disk"
    disk.mkdir()
    build = [sys.executable, "-m", "ccra_export.cli", "build", "--model", str(ccra_checkpoint)]
    build += [a.format(calib=calib_dir) for a in args] + ["-o", str(disk / "out")]
    script = (
        f'mount -t tmpfs -o size={size} tmpfs "$1" || exit 99; shift; "$@"; rc=$?; '
        'echo "left:" $(ls -A "$0") >&2; echo "rc=$rc" >&2; exit $rc'
    )
    # the namespace dies with the shell: the tmpfs is unmounted however the test ends
    result = subprocess.run([*prefix, "sh", "-c", script, str(disk), str(disk), *build], capture_output=True, text=True)
    assert result.returncode != 99, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "rc=2", result.stderr[-3000:]
    assert lines[-2] == "left:", lines[-2]  # the tmpfs is empty: no bundle, staging, scratch or lock
    assert "Traceback" not in result.stderr
    assert lines[-3] == f"error: no space left on device writing {disk / 'out'}: nothing was left behind; " + (
        "free some space and run again"
    ), result.stderr[-3000:]
