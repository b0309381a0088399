"""The first commands a new user types: outside .venv, --help, a bad flag.

Each entry point runs as a real process from the repository's root, as the
README shows it.  `python -S` stands in for a Python without the pinned stack
(a new shell's `python`): it sees the standard library and this repository,
and no site-packages.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

ENTRY_POINTS = [
    ['data-extractor.py', '--work-dir', 'w'],
    ['preprocess.py', '--work-dir', 'w'],
    ['recommend.py', '--model-dir', 'w', '--user', '1'],
    ['plot.py', '--model-dir', 'w'],
    ['-m', 'trainer.task', '--work-dir', 'w'],
    ['-m', 'trainer.tune', '--work-dir', 'w'],
    ['-m', 'trainer.serving', '--model-dir', 'w'],
    ['-m', 'trainer.serving.batch', '--work-dir', 'w'],
]


def _run(*argv: str, isolated: bool = False) -> subprocess.CompletedProcess:
    flags = ['-S'] if isolated else []
    return subprocess.run([sys.executable, *flags, *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize('argv', ENTRY_POINTS, ids=lambda argv: ' '.join(argv[:2]))
def test_outside_the_venv_each_command_names_the_fix_in_one_line(argv):
    done = _run(*argv, isolated=True)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert 'is not installed for' in line and '.venv/bin/python' in line
    assert 'Traceback' not in done.stderr


# What --help must not load: it answers from the flags alone.
_LOADED_AFTER = '''
import runpy, sys
sys.argv = [sys.argv[1], '--help']
try:
    if sys.argv[0].endswith('.py'):
        runpy.run_path(sys.argv[0], run_name='__main__')
    else:
        runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
except SystemExit as done:
    assert done.code in (0, None), done.code
print(sorted(name for name in ('tensorflow', 'apache_beam', 'tensorflow_transform')
             if name in sys.modules))
'''


@pytest.mark.parametrize('program', ['preprocess.py', 'trainer.task'])
def test_help_answers_before_tensorflow_and_beam_load(program):
    done = _run('-c', _LOADED_AFTER, program)
    assert done.returncode == 0, done.stderr
    *help_lines, loaded = done.stdout.splitlines()
    assert loaded == '[]'
    assert any('--work-dir' in line for line in help_lines)


def test_a_bad_trainer_flag_is_one_line_before_tensorflow_loads():
    done = _run('-m', 'trainer.task', '--work-dir', 'w', '--num-epochs', 'many')
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "python -m trainer.task: error: argument --num-epochs: 'many' is not an integer in "
        '[1, 10000]; pass e.g. --num-epochs 40 (the default) (see --help)']


def test_tune_hides_tensorflow_s_start_up_lines():
    from trainer import logs  # pylint: disable=import-outside-toplevel
    done = _run('-m', 'trainer.tune', '--work-dir', 'no-such-dir', '--trials', '0')
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert 'error: --trials 0' in lines[-1]
    assert not [line for line in lines if logs.is_startup_line(line)], lines
