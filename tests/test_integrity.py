"""Nothing lost, nothing silently wrong: NaN weights, two runs in one workdir, results made for
older weights, config changes that keep shapes, failing file systems, interrupts and everyday
mistakes. Each test reproduces the failure as a careless user met it, through the real command."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ddsm_jax.training.checkpoint import Checkpointer, CheckpointError
from ddsm_jax.training.preemption import PreemptionWatch
from ddsm_jax.utils.lock import WorkdirBusyError, WorkdirLock

# The tiny config with one middle width (one compiled train step) and small sample grids.
FAST = ["--config=configs/digits.py:tiny", "--config.model.widths=(1.0,0.5,0.25)",
        "--config.training.batch_size=16", "--config.sampling.num_samples=8",
        "--config.sampling.batch_size=8"]


def run_main(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "ddsm_jax.main", *args], capture_output=True,
                          text=True, **kwargs)


def start_main(*args):
    return subprocess.Popen([sys.executable, "-m", "ddsm_jax.main", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_line_error(done, *fragments, returncode=1):
    """The command failed with `returncode` and one `error:` line holding every fragment."""
    assert done.returncode == returncode, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def train(workdir: Path, num_steps: int, *extra: str):
    done = run_main(*FAST, f"--workdir={workdir}", f"--config.training.num_steps={num_steps}",
                    "--config.training.checkpoint_every=4", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """A workdir trained for 8 steps, with checkpoints at 4 and 8: copied by each test that
    needs trained weights, so the suite trains once."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train(workdir, 8)
    return workdir


@pytest.fixture
def trained(trained_once, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_once, workdir)
    return workdir


def wait_for(predicate, process, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, f"the run ended before {what}: {process.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


# --- 1. NaN weights ---------------------------------------------------------------------------

def test_nan_weights_never_replace_the_good_checkpoints(trained):
    assert checkpoint_steps(trained) == [4, 8]
    # The flags of the report: NaN within a few steps, no logging step before the saves.
    done = run_main(*FAST, f"--workdir={trained}", "--config.training.num_steps=120",
                    "--config.training.learning_rate=1e8", "--config.training.warmup_steps=1",
                    "--config.training.log_every=100", "--config.training.checkpoint_every=10")
    one_line_error(done, "NaN or infinite", "last complete checkpoint (8) is intact")
    assert checkpoint_steps(trained) == [4, 8]
    again = run_main(*FAST, f"--workdir={trained}", "--mode=sample")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["step"] == 8


def test_a_nan_checkpoint_is_neither_saved_nor_restored(tmp_path):
    state = {"w": jnp.array([1.0, jnp.nan]), "step": jnp.array(3)}
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        checkpointer.save(3, state, {"next_index": 3})
    # One written by an older version, which did not check: refused on restore.
    checkpointer.manager.save(3, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"next_index": 3})))
    checkpointer.wait()
    checkpointer.close()
    with pytest.raises(CheckpointError, match=r"step 3 .* holds NaN or infinite weights"):
        Checkpointer(tmp_path / "checkpoints").restore_latest(state)


# --- 2. one run per workdir -------------------------------------------------------------------

_HOLD = ("import sys, time; from ddsm_jax.utils.lock import WorkdirLock; "
         "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")


def test_the_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirBusyError, match=f"in use by pid {holder.pid} on "):
            WorkdirLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: it never releases the lock
        holder.wait()
    with WorkdirLock(tmp_path):
        assert f"taking over the lock of {tmp_path} left by pid {holder.pid}" in capsys.readouterr().err
    with WorkdirLock(tmp_path):  # released cleanly: nothing to take over
        assert capsys.readouterr().err == ""


def test_a_lock_on_an_object_store_is_busy_until_its_heartbeat_stops(tmp_path, capsys):
    from tests.fake_gcs import fake_gcs

    with fake_gcs("lock-bucket"):
        workdir = "gs://lock-bucket/run"
        with WorkdirLock(workdir, heartbeat=0.2), pytest.raises(WorkdirBusyError,
                                                                match="in use by pid"):
            WorkdirLock(workdir).acquire()
        stale = WorkdirLock(workdir, stale_after=0.5).acquire()
        stale._stop.set()  # a preempted VM: its heartbeat stops, its lock stays
        stale._thread.join()
        time.sleep(0.6)
        with WorkdirLock(workdir, stale_after=0.5):
            assert "no heartbeat for" in capsys.readouterr().err


def test_a_second_run_on_a_busy_workdir_is_refused_and_ctrl_c_saves(tmp_path):
    first = start_main(*FAST, f"--workdir={tmp_path}", "--config.training.num_steps=100000",
                       "--config.training.log_every=1", "--config.training.checkpoint_every=100000")
    try:
        metrics = tmp_path / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, first,
                 "training started")
        for mode in ("train", "sample"):
            second = run_main(*FAST, f"--workdir={tmp_path}", f"--mode={mode}",
                              "--config.training.num_steps=8")
            one_line_error(second, f"{tmp_path} is in use by pid {first.pid}")
        first.send_signal(signal.SIGINT)  # Ctrl-C: save, then stop, as on SIGTERM
        _, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "checkpoint saved" in stderr
    steps = checkpoint_steps(tmp_path)
    assert len(steps) == 1 and steps[0] >= 2
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, len(lines) + 1))


def test_sigterm_asks_for_the_same_save_and_stop_as_ctrl_c():
    """Preemption (SIGTERM) takes the path the Ctrl-C test above runs end to end."""
    watch = PreemptionWatch()
    try:
        assert not watch.should_stop(None, 1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watch.should_stop(None, 1)
    finally:
        watch.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_second_ctrl_c_interrupts_at_once():
    watch = PreemptionWatch()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert watch.signalled
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        watch.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- 3. results made for older weights, 4. config changes that keep shapes --------------------

SEARCH = ["--config.search.population_size=5", "--config.search.generations=1",
          "--config.search.num_samples=16", "--config.search.validation_samples=16",
          "--config.eval.num_samples=16", "--config.eval.num_reference=200",
          "--config.export.num_samples=8"]


def test_a_search_never_outlives_the_weights_it_was_made_for(trained, digits_classifier):
    digits_classifier(trained)
    searched = run_main(*FAST, *SEARCH, f"--workdir={trained}", "--mode=search")
    assert searched.returncode == 0, searched.stderr[-3000:]
    old = json.loads((trained / "search" / "schedule.json").read_text())["weights"]
    assert old["step"] == 8
    train(trained, 12)  # more training: the schedule is stale
    for mode in ("evaluate", "export"):
        refused = run_main(*FAST, *SEARCH, f"--workdir={trained}", f"--mode={mode}")
        one_line_error(refused, "schedule.json was made for the weights of step 8",
                       "now holds the weights of step 12", "--mode=search")
    assert not (trained / "eval" / "metrics.json").exists()
    assert not (trained / "export").exists()
    again = run_main(*FAST, *SEARCH, f"--workdir={trained}", "--mode=all",
                     "--config.training.num_steps=12")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "state.json was made for the weights of step 8" in again.stderr
    new = json.loads((trained / "search" / "schedule.json").read_text())["weights"]
    assert new["step"] == 12 and new["sha256"] != old["sha256"]
    for path in ("search/pareto.json", "eval/metrics.json", "export/ddsm_export.json"):
        assert json.loads((trained / path).read_text())["weights"] == new, path


def test_a_config_change_that_keeps_shapes_is_refused_and_recorded_nowhere(trained):
    record = (trained / "config.json").read_bytes()
    for mode in ("sample", "train"):
        done = run_main(*FAST, f"--workdir={trained}", f"--mode={mode}",
                        "--config.model.num_groups=8", "--config.training.num_steps=12")
        one_line_error(done, "checkpoint step 8", "model.num_groups: 4 in the checkpoint, 8 now")
        assert (trained / "config.json").read_bytes() == record
        assert checkpoint_steps(trained) == [4, 8]
    # How the network is computed may change: float32 weights sample in bfloat16 too.
    done = run_main(*FAST, f"--workdir={trained}", "--mode=sample", "--config.model.dtype=bfloat16")
    assert done.returncode == 0, done.stderr[-3000:]


# --- 5. file-system faults --------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(megabytes)`: a tmpfs of that size. A checkpoint of the tiny network takes
    10.7 MB. Skipped where mounting is not allowed."""
    mounts = []

    def mount(megabytes: int) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_stops_the_run_at_once_and_keeps_the_last_checkpoint(small_disk, tmp_path):
    workdir = small_disk(20) / "run"  # room for one checkpoint, not for a second beside it
    done = run_main(*FAST, f"--workdir={workdir}", "--config.training.num_steps=400",
                    "--config.training.checkpoint_every=2", "--config.training.keep_checkpoints=1")
    one_line_error(done, "no room for checkpoint step 4", "last complete checkpoint (2) is intact")
    steps = checkpoint_steps(workdir)
    assert steps, "no checkpoint survived"
    # The last complete checkpoint restores, on a disk with room again.
    copy = tmp_path / "copy"
    os.makedirs(copy / "checkpoints")
    subprocess.run(["cp", "-r", str(workdir / "checkpoints" / str(steps[-1])),
                    str(copy / "checkpoints")], check=True)
    sampled = run_main(*FAST, f"--workdir={copy}", "--mode=sample")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert json.loads(sampled.stdout.strip().splitlines()[-1])["step"] == steps[-1]


def test_a_write_that_fails_half_way_is_one_line_too(small_disk):
    """The room check cannot foresee another process filling the disk: with it switched off, the
    write fails in orbax's background threads, and the user still sees one line, no traceback."""
    workdir = small_disk(8) / "run"
    switched_off = ("import sys; from ddsm_jax.training import checkpoint; "
                    "checkpoint.Checkpointer._check_room = lambda *args: None; "
                    "from ddsm_jax import main; sys.argv[0] = 'ddsm-jax'; main.cli()")
    done = subprocess.run([sys.executable, "-c", switched_off, *FAST, f"--workdir={workdir}",
                           "--config.training.num_steps=40", "--config.training.checkpoint_every=2"],
                          capture_output=True, text=True)
    one_line_error(done, "writing a checkpoint to", "no space left on the device",
                   "No checkpoint was complete yet")


def test_a_read_only_workdir_is_one_line(small_disk, trained_once):
    disk = small_disk(64)
    shutil.copytree(trained_once, disk / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    for mode in ("train", "sample"):
        done = run_main(*FAST, f"--workdir={disk / 'run'}", f"--mode={mode}",
                        "--config.training.num_steps=12")
        one_line_error(done, "Read-only file system")


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    one_line_error(run_main(*FAST, f"--workdir={tmp_path / 'file'}"), str(tmp_path / "file"))
    one_line_error(run_main(*FAST, f"--workdir={tmp_path / 'file' / 'run'}"), "Not a directory")


# --- 7. everyday mistakes: one line, exit status non-zero, no workdir -------------------------

@pytest.mark.parametrize("args,fragments,returncode", [
    (["--config.model.nope=1"], ["unknown config key config.model.nope", "did you mean"], 2),
    (["--config.training.learning_rat=1"], ["config.training.learning_rate"], 2),
    (["--config.model.ch=abc"], ["--config.model.ch=abc"], 2),
    (["--config.model.widths=()"], ["config.model.widths=()", "at least one"], 1),
    (["--config.eval.schedule=NOT_JSON", "--mode=all"], ["NOT_JSON is not a JSON schedule"], 1),
    (["--mode=evaluate"], ["no checkpoint in", "run --mode=train"], 1),
])
def test_everyday_mistakes_are_one_line_and_create_no_workdir(tmp_path, args, fragments,
                                                              returncode):
    (tmp_path / "not.json").write_text("{ nope")
    args = [a.replace("NOT_JSON", str(tmp_path / "not.json")) for a in args]
    fragments = [f.replace("NOT_JSON", str(tmp_path / "not.json")) for f in fragments]
    workdir = tmp_path / "run"
    base = [f for f in FAST if not any(a.split("=")[0] == f.split("=")[0] for a in args)]
    one_line_error(run_main(*base, f"--workdir={workdir}", *args), *fragments,
                   returncode=returncode)
    assert not workdir.exists()


def test_a_missing_config_file_is_one_line_and_creates_no_workdir(tmp_path):
    done = run_main("--config=configs/nope.py", f"--workdir={tmp_path / 'run'}")
    one_line_error(done, "no config file configs/nope.py", returncode=2)
    assert not (tmp_path / "run").exists()


# --- 9. smaller -------------------------------------------------------------------------------

def _events(path: Path):
    """The events of a TensorBoard file (TFRecord framing: length, its CRC, data, its CRC)."""
    from tensorboardX.proto import event_pb2

    data, offset = path.read_bytes(), 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = event_pb2.Event()
        event.ParseFromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        yield event


def test_a_resumed_run_purges_the_later_tensorboard_events(tmp_path):
    """A run killed after logging step 6 but before saving it resumes from step 4 and logs step
    6 again: TensorBoard must show it once, as metrics.jsonl does."""
    from ddsm_jax.layout import Workdir
    from ddsm_jax.training.metrics import MetricWriter

    layout = Workdir(tmp_path)
    with MetricWriter(layout) as writer:
        for step in (2, 4, 6):
            writer.write_scalars(step, {"loss": float(step)})
    time.sleep(1.1)  # event files are named by the second they were opened in
    with MetricWriter(layout, start_step=4) as writer:
        writer.write_scalars(6, {"loss": 60.0})
    kept = []  # what TensorBoard shows: a START marker at step s drops earlier events >= s
    for path in sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*")):
        for event in _events(path):
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                kept = [(step, value) for step, value in kept if step < event.step]
            for value in event.summary.value:
                kept.append((event.step, value.simple_value))
    assert kept == [(2, 2.0), (4, 4.0), (6, 60.0)]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in lines] == [2.0, 4.0, 60.0]


# --- 8. the Python API --------------------------------------------------------------------------

def test_the_python_api_refuses_what_it_cannot_mean(tmp_path):
    from ddsm_jax import export
    from ddsm_jax.models.network import init_network
    from tests.helpers import tiny_config

    config = tiny_config()
    _, params = init_network(config, jax.random.key(0))
    export.save(tmp_path / "export", config, params)
    model = export.load(tmp_path / "export")
    steps = model.sampler.num_steps
    with pytest.raises(ValueError, match=r"widths, not indices\?"):
        model.sample(4, schedule=np.full(steps, 0.5))
    for wrong in (np.full(steps - 1, 1), np.full(steps, 7), np.full(steps, -1)):
        with pytest.raises(ValueError, match=f"{steps} integer indices"):
            model.sample(4, schedule=wrong)
    for count in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_samples must be a positive integer"):
            model.sample(count)
    assert model.sample(2, schedule=np.full(steps, 1)).shape == (2, 8, 8, 1)


@pytest.mark.parametrize("fault", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["full disk", "ctrl-c"])
def test_a_failed_export_leaves_no_hidden_folders(tmp_path, monkeypatch, fault):
    from ddsm_jax import export
    from ddsm_jax.models.network import init_network
    from tests.helpers import tiny_config

    config = tiny_config()
    _, params = init_network(config, jax.random.key(0))
    (tmp_path / ".export.tmp999999").mkdir()  # left by an export that was killed
    (tmp_path / ".export.old999999").mkdir()

    def fail(*args, **kwargs):
        raise fault

    with monkeypatch.context() as patch:
        patch.setattr(export, "write_json", fail)
        with pytest.raises(type(fault)):
            export.save(tmp_path / "export", config, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    export.save(tmp_path / "export", config, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
