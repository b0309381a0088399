"""run-local.sh and run-tests.sh: every flag checked, every value used as given, never run.

(run-cloud.sh has its own tests in test_run_cloud.py.)  A bad flag gets one
error line and exit 2 before any step or set-up runs; values holding spaces,
';', '$(...)' or backquotes are passed to the steps as literal paths and
arguments, so they can name a real directory but cannot run a command.
"""

from __future__ import annotations

import pathlib
import subprocess

import pytest

from conftest import REPO
from trainer import features
from trainer.pipeline import synthetic

# Shell that would create a canary file if any value were ever evaluated.
INJECTIONS = ('; touch {canary}', '$(touch {canary})', '`touch {canary}`', '&& touch {canary}')
BAD_FLAGS = [
    (['--dataset', 'x{injection}'], "--dataset 'x"),
    (['--dataset', 'ml-100k ml-1m'], "--dataset 'ml-100k ml-1m' is unknown"),
    (['--dataset=ml-100k{injection}'], "--dataset 'ml-100k"),
    (['--dataset', ''], "--dataset '' is unknown"),
    (['--dataset'], '--dataset needs a value'),
    (['--work-dir'], '--work-dir needs a value'),
    (['--work-dir', ''], '--work-dir is empty'),
    (['--work-dir='], '--work-dir is empty'),
    (['--work-dir', '--overwrite'], "--work-dir '--overwrite' looks like a flag"),
    (['--work-dir', 'a\nb{injection}'], 'holds a control character'),
    (['--fig-dir='], '--fig-dir is empty'),
    (['--data-sources', ''], '--data-sources is empty'),
    (['--data-sources', '-x.zip'], "--data-sources '-x.zip' looks like a flag"),
    (['--frobnicate{injection}'], "unknown flag '--frobnicate"),
    (['--overwrite=yes'], "unknown flag '--overwrite=yes'"),
    (['-x'], "unknown flag '-x'"),
    (['--', '--num-epochs', '1', '--work-dir', 'elsewhere'], '--work-dir after --'),
]
# Each case once; the ones with a value to inject into, once per injection.
BAD_FLAG_CASES = [
    pytest.param(args, phrase, injection, id=f'{" ".join(args)}|{injection}')
    for args, phrase in BAD_FLAGS
    for injection in (INJECTIONS if '{injection}' in ''.join(args) else ('',))]


def _replay(echoed: str) -> list[str]:
    """The arguments bash reads back from an echoed '+ cmd args...' line."""
    result = subprocess.run(['bash', '-c', 'printf "%s\\n" ' + echoed[2:]],
                            capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def _run(script: str, *args: str, cwd: pathlib.Path, timeout: float = 60
         ) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', str(REPO / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.parametrize('args, phrase, injection', BAD_FLAG_CASES)
def test_run_local_refuses_a_bad_flag_in_one_line_before_any_step(
        tmp_path, args, phrase, injection):
    canary = tmp_path / 'CANARY'
    args = [arg.replace('{injection}', injection.format(canary=canary)) for arg in args]

    result = _run('run-local.sh', *args, cwd=tmp_path)

    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('run-local.sh: error: ') and phrase in err[0]
    assert result.stdout == ''  # no set-up, no step echoed
    assert not canary.exists()
    assert not (REPO / 'CANARY').exists()


@pytest.fixture(scope='module')
def weird_paths(tmp_path_factory) -> dict[str, pathlib.Path]:
    """A small ml-100k-layout zip, and work and chart dirs, all named with shell characters."""
    root = tmp_path_factory.mktemp('scripts')
    odd = root / 'my data; $(touch CANARY) `touch CANARY` & x'
    odd.mkdir()
    archive = odd / 'ratings (copy).zip'
    synthetic.write_archive(str(archive), synthetic.SyntheticConfig(
        num_users=60, num_movies=50, num_ratings=1_000, layout='ml-100k'))
    return {'root': root, 'archive': archive, 'work_dir': odd / 'work dir',
            'fig_dir': odd / 'fig $HOME'}


def test_run_local_uses_values_with_spaces_and_shell_characters_as_literal_paths(weird_paths):
    work_dir, fig_dir = weird_paths['work_dir'], weird_paths['fig_dir']
    result = _run('run-local.sh', '--work-dir', str(work_dir), '--dataset', 'ml-100k',
                  '--data-sources', str(weird_paths['archive']), '--fig-dir', str(fig_dir),
                  '--', '--num-epochs', '1', '--num-factors', '4', cwd=weird_paths['root'],
                  timeout=600)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    info = features.read_dataset_info(str(work_dir))
    assert info.rows_accepted == 1_000
    assert features.read_source_info(str(work_dir)).source == str(weird_paths['archive'])
    assert (work_dir / features.MODEL_DIR / features.EXPORT_DIR / 'saved_model.pb').exists()
    assert (fig_dir / 'ml-100k-loss.png').read_bytes()[:4] == b'\x89PNG'
    # Each step is echoed as a line that can be pasted back into a shell.
    echoed = [line for line in result.stdout.splitlines() if line.startswith('+ python')]
    assert len(echoed) == 4
    assert _replay(echoed[0]) == [
        'python', 'data-extractor.py', '--work-dir', str(work_dir), '--dataset', 'ml-100k',
        '--data-sources', str(weird_paths['archive'])]
    for place in (REPO, weird_paths['root'], weird_paths['root'].parent, pathlib.Path.cwd()):
        assert not (place / 'CANARY').exists()


def test_run_tests_passes_each_argument_intact(tmp_path):
    odd = tmp_path / 'tests; $(touch CANARY) `touch CANARY`'
    odd.mkdir()
    (odd / 'test_probe.py').write_text('def test_probe():\n    assert True\n')
    report = odd / 'report & summary.xml'

    result = _run('run-tests.sh', '-q', '-p', 'no:cacheprovider', '--junitxml', str(report),
                  str(odd / 'test_probe.py'), cwd=tmp_path, timeout=300)

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert '1 passed' in result.stdout
    assert 'test_probe' in report.read_text()
    assert not (tmp_path / 'CANARY').exists() and not (REPO / 'CANARY').exists()
    assert _replay(result.stdout.splitlines()[0]) == [
        'python', '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '--junitxml', str(report),
        str(odd / 'test_probe.py')]
    assert not (tmp_path / 'CANARY').exists() and not pathlib.Path('CANARY').exists()


def test_run_local_resolves_relative_paths_from_where_it_was_started(tmp_path):
    result = _run(str(REPO / 'run-local.sh'), '--work-dir', 'rel work', '--data-sources',
                  'missing.zip', '--dataset', 'ml-100k', cwd=tmp_path)
    assert result.returncode != 0
    (extract,) = [line for line in result.stdout.splitlines()
                  if line.startswith('+ python data-extractor.py')]
    argv = _replay(extract)
    assert argv[argv.index('--work-dir') + 1] == str(tmp_path / 'rel work')
    assert argv[argv.index('--data-sources') + 1] == str(tmp_path / 'missing.zip')
    assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('args, phrase', [
    (['--frobnicate'], "unknown flag '--frobnicate'"),
    (['--work-dir'], '--work-dir needs a directory'),
])
def test_refresh_readme_chart_refuses_a_bad_flag_before_running(tmp_path, args, phrase):
    result = _run('scripts/refresh-readme-chart.sh', *args, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr.strip() == f'refresh-readme-chart.sh: error: {phrase}' + (
        '; see scripts/refresh-readme-chart.sh --help' if 'unknown' in phrase else '')


def test_run_local_passes_verbose_to_each_step(tmp_path):
    result = _run(str(REPO / 'run-local.sh'), '--verbose', '--work-dir', 'w', '--data-sources',
                  'missing.zip', '--dataset', 'ml-100k', cwd=tmp_path)
    assert result.returncode != 0  # the extractor stops: no such file
    (extract,) = [line for line in result.stdout.splitlines()
                  if line.startswith('+ python data-extractor.py')]
    assert '--verbose' in _replay(extract)


def _fake_repo(root: pathlib.Path, pip_exit: int) -> pathlib.Path:
    """A checkout holding scripts/venv.sh and a .venv whose pip prints 40 lines."""
    (root / 'scripts').mkdir(parents=True)
    (root / 'scripts' / 'venv.sh').write_text((REPO / 'scripts' / 'venv.sh').read_text())
    for name in ('requirements.txt', 'requirements-dev.txt', 'constraints.txt'):
        (root / name).write_text('numpy==0\n')
    python = root / '.venv' / 'bin' / 'python'
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\nfor i in $(seq 40); do echo "pip line $i"; done\n'
                      f'exit {pip_exit}\n')
    python.chmod(0o755)
    return root


@pytest.mark.parametrize('pip_exit', [0, 1])
def test_venv_set_up_prints_one_line_per_stage_and_keeps_pips_log(tmp_path, pip_exit):
    root = _fake_repo(tmp_path / 'checkout', pip_exit)
    result = subprocess.run(['bash', '-c', 'source scripts/venv.sh && ensure_venv'], cwd=root,
                            capture_output=True, text=True, timeout=60, check=False)

    log = root / '.venv' / 'install.log'
    assert log.read_text().splitlines() == [f'pip line {i}' for i in range(1, 41)]
    assert 'pip line' not in result.stdout
    assert result.stdout.startswith('== installing the pinned packages into .venv')
    if pip_exit == 0:
        assert result.returncode == 0 and result.stdout.splitlines()[-1] == '== .venv ready'
        assert (root / '.venv' / '.installed').exists()
    else:  # the end of pip's log, and where the rest is
        assert result.returncode == 1 and not (root / '.venv' / '.installed').exists()
        err = result.stderr.splitlines()
        assert err[1:-1] == [f'pip line {i}' for i in range(26, 41)]
        assert err[-1] == f'error: full log: {log}'
