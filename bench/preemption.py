"""What a SIGTERM costs the trainer: seconds to a clean exit in each phase, and the result after.

    .venv/bin/python bench/preemption.py --work-dir WORK_DIR [-- TRAINER_FLAGS...]

WORK_DIR must hold preprocess.py's output.  The trainer (default flags plus
TRAINER_FLAGS) runs uninterrupted once, then once more under a fresh job dir
where it gets SIGTERM in its epochs, its posterior sweeps and its top-N
iterations (a run each, each resumed by the next); the script prints, per
stop, the seconds from the signal to the process's exit and where it stopped,
then both runs' eval RMSE and NDCG@10.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
# (what to wait for in the log, the phase's name)
_STOPS = ((r'trainer\.rating\.train: Epoch 2/', 'epochs'),
          (r'Posterior sweep 20/', 'posterior sweeps'),
          (r'Top-N iteration 1/', 'top-N iterations'))
_STOPPED = re.compile(r'SIGTERM: stopped after the checkpoint of (.*?), ([\d.]+) s after')


def _start(work_dir: str, job_dir: str, flags: list[str], log: pathlib.Path) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(('AIP_', 'CLOUD_ML_')) and key not in ('TF_CONFIG',
                                                                         'CLUSTER_SPEC')}
    with open(log, 'wb') as err:
        return subprocess.Popen([sys.executable, '-m', 'trainer.task', '--work-dir', work_dir,
                                 '--job-dir', job_dir, *flags], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)


def _stop_in(process: subprocess.Popen, log: pathlib.Path,
             trigger: str) -> tuple[float, str, str]:
    while not re.search(trigger, log.read_text(errors='replace')):
        if process.poll() is not None:
            sys.exit(f'the trainer ended before {trigger!r}; see {log}')
        time.sleep(0.005)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait()
    seconds = time.monotonic() - signalled
    if code != 0:
        sys.exit(f'the trainer exited {code} after SIGTERM; see {log}')
    found = _STOPPED.search(log.read_text(errors='replace'))
    return seconds, *(found.groups() if found else ('no stop line', '-'))


def _scores(job_dir: str) -> tuple[float, float]:
    with open(os.path.join(job_dir, 'metrics.json'), encoding='utf-8') as f:
        metrics = json.load(f)
    return metrics['eval_rmse'], metrics['ranking']['model']['ndcg']


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    parser.add_argument('--work-dir', required=True)
    parser.add_argument('trainer_flags', nargs='*')
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix='preemption-') as scratch:
        root = pathlib.Path(scratch)
        baseline = _start(args.work_dir, str(root / 'baseline'), args.trainer_flags,
                          root / 'baseline.log')
        if baseline.wait() != 0:
            sys.exit(f'the uninterrupted run failed: {(root / "baseline.log").read_text()[-2000:]}')
        job_dir = str(root / 'stopped')
        print('| phase | stopped after | SIGTERM to checkpoint written, s | to exit, s |\n'
              '| --- | --- | --- | --- |')
        for number, (trigger, phase) in enumerate(_STOPS):
            log = root / f'stopped-{number}.log'
            seconds, where, written = _stop_in(
                _start(args.work_dir, job_dir, args.trainer_flags, log), log, trigger)
            print(f'| {phase} | {where} | {written} | {seconds:.2f} |')
        if _start(args.work_dir, job_dir, args.trainer_flags, root / 'resumed.log').wait() != 0:
            sys.exit('the resumed run failed')
        for name, directory in (('uninterrupted', str(root / 'baseline')), ('stopped 3 times',
                                                                           job_dir)):
            rmse, ndcg = _scores(directory)
            print(f'{name}: eval RMSE {rmse:.6f}, NDCG@10 {ndcg:.6f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
