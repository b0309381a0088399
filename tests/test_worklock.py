"""Two runs on one work dir: the second refuses in one line; a dead holder's lock is taken over.

Real processes throughout: a holder process (a `sleep`, as run-local.sh's
shell holds the chain's lock, or a trainer frozen with SIGSTOP mid-run) and
the real steps started against its lock, on local disk and on the GCS
emulator (an object created with ifGenerationMatch=0).  Concurrent
`acquire`s race for one lock and exactly one wins.  A data step stopped by
SIGTERM leaves nothing half written and no lock, and the next run starts
cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from trainer import features
from trainer import worklock

SYNTHETIC = ['--dataset', 'synthetic', '--num-users', '60', '--num-movies', '50',
             '--num-ratings', '1500']
HELD = re.compile(r'(?P<dir>\S+) is in use by another run: pid (?P<pid>\d+) on (?P<host>\S+), '
                  r'started (?P<started>\S+) \((?P<command>.*)\); wait for it, or if it is no '
                  r'longer running, break the lock: (?P<hint>.*)$')


def _python(*args: str, env: dict | None = None, cwd=REPO, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture
def holder():
    """A real process to hold a lock for (as run-local.sh's shell does); killed after."""
    process = subprocess.Popen(['sleep', '300'])
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def _acquire_for(directory: str, pid: int, env: dict | None = None) -> str:
    result = _python('-m', 'trainer.worklock', 'acquire', '--dir', directory, '--pid', str(pid),
                     '--command', 'the first run', env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _refusal(stderr: str) -> re.Match:
    lines = [line for line in stderr.splitlines() if 'in use by another run' in line]
    assert len(lines) == 1, stderr[-3000:]
    assert 'Traceback' not in stderr
    match = HELD.search(lines[0])
    assert match, lines[0]
    return match


# --- Local disk. -------------------------------------------------------------------------
def test_a_step_on_a_locked_work_dir_refuses_naming_the_holder_then_takes_a_dead_ones_lock(
        work_dir, holder):
    _acquire_for(work_dir, holder.pid)
    extract = ['data-extractor.py', '--work-dir', work_dir, *SYNTHETIC]

    refused = _python(*extract)
    assert refused.returncode == 1
    match = _refusal(refused.stderr)
    assert (match['dir'], int(match['pid']), match['host']) == (
        work_dir, holder.pid, socket.gethostname())
    assert match['command'] == 'the first run'
    assert match['hint'] == f'rm {work_dir}/{features.LOCK_FILE}'
    assert not os.path.exists(features.raw_dir(work_dir))  # nothing was written

    holder.kill()
    holder.wait()
    taken = _python(*extract)
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert re.search(rf'Taking over the stale lock \S+ of pid {holder.pid} on '
                     rf'{re.escape(socket.gethostname())}, started \S+: pid {holder.pid} has '
                     'exited', taken.stderr)
    assert os.path.exists(features.join(features.raw_dir(work_dir), features.SOURCE_FILE))
    assert not os.path.exists(worklock.lock_path(work_dir))  # released


@pytest.mark.parametrize('step, error_prefix', [
    (['preprocess.py'], 'preprocess.py: error: '),
    (['-m', 'trainer.serving.batch'], 'batch_recommendations: error: '),
])
def test_the_other_work_dir_steps_refuse_a_locked_work_dir(work_dir, holder, step,
                                                            error_prefix):
    _acquire_for(work_dir, holder.pid)
    refused = _python(*step, '--work-dir', work_dir)
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1].startswith(error_prefix)
    assert int(_refusal(refused.stderr)['pid']) == holder.pid
    assert os.listdir(work_dir) == [features.LOCK_FILE]  # nothing written


def test_concurrent_acquires_give_the_lock_to_exactly_one(work_dir, holder):
    racers = [subprocess.Popen(
        [sys.executable, '-m', 'trainer.worklock', 'acquire', '--dir', work_dir, '--pid',
         str(holder.pid), '--command', f'racer {number}'], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for number in range(4)]
    results = [(racer.wait(timeout=120), *racer.communicate()) for racer in racers]
    winners = [out.strip() for code, out, _ in results if code == 0]
    assert len(winners) == 1, results
    assert sorted(code for code, _, _ in results) == [0, 2, 2, 2]
    with open(worklock.lock_path(work_dir), encoding='utf-8') as f:
        assert json.load(f)['token'] == winners[0]


def _trainer(work_dir: str, job_dir: str, err) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(('AIP_', 'CLOUD_ML_')) and key not in ('TF_CONFIG',
                                                                         'CLUSTER_SPEC')}
    return subprocess.Popen(
        [sys.executable, '-m', 'trainer.task', '--work-dir', work_dir, '--job-dir', job_dir,
         '--num-epochs', '3', '--num-factors', '4', '--posterior-samples', '20',
         '--posterior-burn-in', '5', '--topn-iterations', '2'],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)


def test_a_second_trainer_on_a_model_dir_in_use_refuses_and_the_first_finishes(
        work_dir, tmp_path):
    assert _python('data-extractor.py', '--work-dir', work_dir, *SYNTHETIC).returncode == 0
    assert _python('preprocess.py', '--work-dir', work_dir).returncode == 0
    job_dir = str(tmp_path / 'model')
    err_path = tmp_path / 'first.err'
    with open(err_path, 'wb') as err:
        first = _trainer(work_dir, job_dir, err)
    try:
        deadline = time.monotonic() + 240
        while 'trainer.rating.train: Epoch 1/' not in err_path.read_text(errors='replace'):
            assert first.poll() is None and time.monotonic() < deadline, \
                err_path.read_text(errors='replace')[-3000:]
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # mid-run, holding the lock
        with open(tmp_path / 'second.err', 'wb') as err:
            second = _trainer(work_dir, job_dir, err)
        assert second.wait(timeout=240) == 2
        second_err = (tmp_path / 'second.err').read_text()
        match = _refusal(second_err)
        assert second_err.splitlines()[-1].startswith('trainer: error: ')
        assert (match['dir'], int(match['pid'])) == (job_dir, first.pid)
        assert 'trainer.task' in match['command']
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=240) == 0, err_path.read_text(errors='replace')[-3000:]
    assert os.path.exists(os.path.join(job_dir, features.METRICS_FILE))
    assert not os.path.exists(worklock.lock_path(job_dir))


def test_run_local_refuses_a_locked_work_dir_before_any_step(work_dir, holder, tmp_path):
    _acquire_for(work_dir, holder.pid)
    result = subprocess.run(['bash', str(REPO / 'run-local.sh'), '--work-dir', work_dir,
                             '--dataset', 'synthetic'], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert '+ python' not in result.stdout  # no step ran
    [line] = [line for line in result.stderr.splitlines() if 'in use' in line]
    assert line.startswith('run-local.sh: error: ')
    assert int(_refusal(line)['pid']) == holder.pid


def test_run_local_stopped_by_sigterm_stops_its_step_and_releases_every_lock(work_dir,
                                                                            tmp_path):
    from trainer.pipeline import synthetic  # pylint: disable=import-outside-toplevel
    archive = tmp_path / 'ratings.zip'
    synthetic.write_archive(str(archive), synthetic.SyntheticConfig(
        num_users=60, num_movies=50, num_ratings=1_000, layout='ml-100k'))
    out_path, err_path = tmp_path / 'run-local.out', tmp_path / 'run-local.err'
    with open(out_path, 'wb') as out, open(err_path, 'wb') as err:
        script = subprocess.Popen(
            ['bash', str(REPO / 'run-local.sh'), '--work-dir', work_dir, '--data-sources',
             str(archive), '--', '--num-epochs', '200', '--early-stopping-patience', '0',
             '--num-factors', '4'], cwd=tmp_path, stdout=out, stderr=err)
    code = _terminate_when(
        script, lambda: 'trainer.rating.train: Epoch 2/' in err_path.read_text(errors='replace'))
    log = err_path.read_text(errors='replace')
    assert code == 143, log[-3000:]
    assert re.search(r'SIGTERM: stopped after the checkpoint of epoch \d+', log)
    assert log.splitlines()[-1] == ('run-local.sh: stopped during train; run the same '
                                    'command to resume')
    assert '+ python plot.py' not in out_path.read_text()  # no step after it
    assert not os.path.exists(worklock.lock_path(work_dir))
    assert not os.path.exists(worklock.lock_path(features.default_model_dir(work_dir)))


# --- What counts as stale. ---------------------------------------------------------------
def _write_lock(directory: str, **changes) -> worklock.Holder:
    holder = dataclasses.replace(worklock.make_holder('an earlier run'), **changes)
    os.makedirs(directory, exist_ok=True)
    with open(worklock.lock_path(directory), 'w', encoding='utf-8') as f:
        json.dump(dataclasses.asdict(holder), f)
    return holder


def test_a_lock_of_another_host_is_never_guessed_stale(work_dir):
    _write_lock(work_dir, host='another-host', pid=99999999)
    with pytest.raises(worklock.LockHeld, match='pid 99999999 on another-host'):
        worklock.acquire(work_dir, worklock.make_holder('second'))


def test_a_lock_of_this_process_is_held_not_stale(work_dir):
    lock = worklock.acquire(work_dir, worklock.make_holder('first'))
    with pytest.raises(worklock.LockHeld, match=f'pid {os.getpid()} on'):
        worklock.acquire(work_dir, worklock.make_holder('second'))
    worklock.release(lock)
    assert not os.path.exists(worklock.lock_path(work_dir))


@pytest.mark.parametrize('changes, reason', [
    ({'pid': 99999999}, 'pid 99999999 has exited'),
    ({'process_start': '1'}, 'is another process now'),  # this pid, but started at another time
])
def test_a_dead_holder_on_this_host_is_taken_over(work_dir, changes, reason, caplog):
    _write_lock(work_dir, **changes)
    lock = worklock.acquire(work_dir, worklock.make_holder('second'))
    assert reason in caplog.text
    worklock.release(lock)


def test_an_earlier_attempt_of_the_same_vertex_job_is_taken_over(work_dir, monkeypatch, caplog):
    _write_lock(work_dir, host='workerpool0-0', job_id='1234')
    monkeypatch.setenv(worklock.ENV_JOB_ID, '1234')
    worklock.release(worklock.acquire(work_dir, worklock.make_holder('restarted')))
    assert 'an earlier attempt of this job (1234)' in caplog.text


def test_a_step_under_its_chains_token_runs_and_leaves_the_chains_lock(work_dir, monkeypatch):
    lock = worklock.acquire(work_dir, worklock.make_holder('the chain'))
    monkeypatch.setenv(worklock.ENV_TOKEN, lock.holder.token)
    with worklock.hold(work_dir, 'a step'):
        pass
    assert os.path.exists(worklock.lock_path(work_dir))
    monkeypatch.setenv(worklock.ENV_TOKEN, 'another chain')
    with pytest.raises(worklock.LockHeld):
        with worklock.hold(work_dir, 'a step'):
            pass
    worklock.release(lock)


# --- SIGTERM in the data steps. ----------------------------------------------------------
def _terminate_when(process: subprocess.Popen, ready, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, 'the step ended before the signal'
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=120)


def test_preprocess_stopped_by_sigterm_leaves_no_output_and_no_lock_and_reruns(work_dir,
                                                                               tmp_path):
    assert _python('data-extractor.py', '--work-dir', work_dir, *SYNTHETIC).returncode == 0
    out_dir = pathlib.Path(features.transformed_dir(work_dir))
    err_path = tmp_path / 'preprocess.err'
    with open(err_path, 'wb') as err:
        process = subprocess.Popen([sys.executable, 'preprocess.py', '--work-dir', work_dir],
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    # Stopped while the pipeline writes into transformed/.
    code = _terminate_when(process, lambda: out_dir.is_dir() and any(out_dir.iterdir()))
    log = err_path.read_text(errors='replace')
    assert code == 143, log[-3000:]
    assert 'Stopped by SIGTERM: removing the unfinished output' in log
    assert 'Traceback' not in log
    assert not out_dir.exists()
    assert not os.path.exists(worklock.lock_path(work_dir))

    rerun = _python('preprocess.py', '--work-dir', work_dir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert features.read_dataset_info(work_dir).train_ratings > 0


def test_data_extractor_stopped_by_sigterm_stages_nothing_and_reruns(work_dir, tmp_path):
    flags = ['data-extractor.py', '--work-dir', work_dir, '--dataset', 'synthetic',
             '--num-ratings', '300000']
    err_path = tmp_path / 'extract.err'
    with open(err_path, 'wb') as err:
        process = subprocess.Popen([sys.executable, *flags], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=err)
    code = _terminate_when(process, lambda: 'generating' in err_path.read_text(errors='replace'))
    assert code == 143, err_path.read_text(errors='replace')[-3000:]
    raw_dir = pathlib.Path(features.raw_dir(work_dir))
    assert not raw_dir.exists() or not any(raw_dir.iterdir())
    assert not os.path.exists(worklock.lock_path(work_dir))
    rerun = _python('data-extractor.py', '--work-dir', work_dir, *SYNTHETIC)
    assert rerun.returncode == 0, rerun.stderr[-3000:]


# --- gs://, on the emulator. -------------------------------------------------------------
def test_a_gcs_work_dir_is_locked_by_a_generation_0_object(gcs, holder, tmp_path):
    from google.cloud import storage  # pylint: disable=import-outside-toplevel
    work_dir = gcs.url('locked-run')
    env = {**gcs.env, 'PYTHONPATH': str(REPO)}
    token = _acquire_for(work_dir, holder.pid, env=env)
    blob = storage.Client().bucket(gcs.bucket).get_blob(f'locked-run/{features.LOCK_FILE}')
    assert json.loads(blob.download_as_bytes())['pid'] == holder.pid

    # A second acquire loses even against the same object name, from several processes.
    racers = [subprocess.Popen([sys.executable, '-m', 'trainer.worklock', 'acquire', '--dir',
                                work_dir, '--command', 'racer'], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(3)]
    assert [racer.wait(timeout=120) for racer in racers] == [2, 2, 2]
    for racer in racers:
        racer.communicate()

    refused = _python(str(REPO / 'data-extractor.py'), '--work-dir', work_dir, *SYNTHETIC,
                      env=env, cwd=tmp_path)
    assert refused.returncode == 1
    match = _refusal(refused.stderr)
    assert int(match['pid']) == holder.pid
    assert match['hint'] == f'gcloud storage rm {work_dir}/{features.LOCK_FILE}'

    released = _python('-m', 'trainer.worklock', 'release', '--dir', work_dir, '--token', token,
                       env=env)
    assert released.returncode == 0, released.stderr
    staged = _python(str(REPO / 'data-extractor.py'), '--work-dir', work_dir, *SYNTHETIC,
                     env=env, cwd=tmp_path)
    assert staged.returncode == 0, staged.stderr[-3000:]
    names = {item.name for item in storage.Client().list_blobs(gcs.bucket, prefix='locked-run/')}
    assert f'locked-run/{features.LOCK_FILE}' not in names
    assert f'locked-run/raw/{features.SOURCE_FILE}' in names
