"""Tests for bench/scale.py: flags, and one small run whose table must add up.

The run uses 200k ratings and 2 epochs (about 45-55 s on two busy cores). No
test asserts anything about time: timings depend on the machine's load.
"""

from __future__ import annotations

import csv
import json
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import REPO, load_script

from trainer import features

scale = load_script('bench/scale.py')


@pytest.mark.parametrize('text, expected', [
    ('200k', 200_000), ('1m', 1_000_000), ('25M', 25_000_000), ('1.5m', 1_500_000),
    ('50000', 50_000)])
def test_parse_size(text: str, expected: int) -> None:
    assert scale.parse_size(text) == expected


@pytest.mark.parametrize('text', ['', 'k', '1g', '-1m', 'one'])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match='is not a size'):
        scale.parse_size(text)


@pytest.mark.parametrize('argv, flag', [
    (['--sizes', '1x'], '--sizes'), (['--sizes', '5k'], '--sizes'),
    (['--epochs', '0'], '--epochs'), (['--seed', '-1'], '--seed'),
    (['--repeats', '0'], '--repeats'),
    (['--data-sources', '/no/such.zip'], '--data-sources'),
    (['--sizes', '1m', '--data-sources', __file__], '--sizes')])
def test_bad_flags_exit_2_with_one_line(argv: list[str], flag: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        scale.parse_args(argv)
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines()
                   if line.startswith('bench/scale.py: error:')]
    assert len(error_lines) == 1 and flag in error_lines[0]


def test_names_match_features() -> None:
    """bench/scale.py repeats these to stay TensorFlow-free; they must agree."""
    layout = features.DATASETS[scale.DATASET]
    assert layout.ratings_header and layout.rating_step == pytest.approx(0.5)
    assert scale.DATASET_INFO_PATH == (features.TRANSFORMED_DIR, features.DATASET_INFO_FILE)
    assert scale.METRICS_PATH == (features.MODEL_DIR, features.METRICS_FILE)
    assert scale.LOSS_LOG_PATH == (features.MODEL_DIR, features.LOSS_LOG_FILE)
    assert scale.USAGE_DIR == features.USAGE_DIR


def test_the_usage_reader_loads_no_tensorflow() -> None:
    result = subprocess.run(
        [sys.executable, '-c', 'import sys; sys.path.insert(0, "bench"); import scale; '
         'print(sorted({"tensorflow", "numpy"} & set(sys.modules)))'],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == '[]'
    assert scale.USAGE_FILES['train'] == 'trainer' and set(scale.USAGE_FILES.values()) <= set(
        features.USAGE_STEPS)


def test_shape_follows_ml_25m() -> None:
    assert scale.synthetic_shape(25_000_000) == (162_541, 59_047)
    users, movies = scale.synthetic_shape(1_000_000)
    assert (users, movies) == (6_502, 11_809)


def test_run_200k_adds_up(tmp_path: pathlib.Path) -> None:
    json_out = tmp_path / 'scale.json'
    result = subprocess.run(
        [sys.executable, 'bench/scale.py', '--sizes', '200k', '--epochs', '2',
         '--work-root', str(tmp_path / 'root'), '--json-out', str(json_out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'JSON: {json_out}' in result.stdout
    (row,) = json.loads(json_out.read_text())['results']
    assert row['label'] == '200k'
    assert [step['name'] for step in row['steps']] == list(scale.STEPS)
    for step in row['steps']:
        for key in ('seconds', 'ratings_per_second', 'peak_tree_rss_bytes',
                    'max_process_rss_bytes'):
            assert step[key] > 0, (step['name'], key)
        assert step['name'] in result.stdout
    counts = row['counts']
    assert counts['generated'] == 200_000 == counts['rows_read']
    assert counts['rows_read'] == counts['rows_accepted'] + counts['rows_rejected']
    assert counts['train_ratings'] + counts['eval_ratings'] == counts['rows_accepted']
    # What each step used, from its own samples: busy, and within its ru_maxrss.
    assert list(row['usage']) == ['extract', 'preprocess', 'train']
    for step in row['steps'][:3]:
        used = row['usage'][step['name']]
        assert used['samples'] >= 1 and 0 < used['mean_cpu_cores'] <= used['peak_cpu_cores'] + 1e-9
        # /proc's resident count lags by a few pages a thread: 1% slack.
        assert 0 < used['mean_rss_bytes'] <= used['peak_rss_bytes']
        assert used['peak_rss_bytes'] <= 1.01 * step['max_process_rss_bytes']
        assert f'{used["peak_rss_bytes"] / 2**20:13.0f}' in result.stdout
    trainer = row['trainer']
    assert set(trainer['phase_seconds']) >= {'load', 'rating_epochs', 'posterior', 'export'}
    _check_trainer_breakdown(row)
    # The model scored: better than the train mean, not better than the planted truth.
    assert row['noise_floor_rmse'] < row['global_mean_eval_rmse']
    assert 0.98 * row['noise_floor_rmse'] < row['eval_rmse'] < row['global_mean_eval_rmse']


# Log timestamps have millisecond resolution.
_LOG_TICK = 0.002


def _check_trainer_breakdown(row: dict) -> None:
    """The trainer's parts agree with the loss log, the trainer's log and the step's wall time."""
    trainer = row['trainer']
    work_dir = pathlib.Path(row['work_dir'])
    with open(work_dir / features.MODEL_DIR / features.LOSS_LOG_FILE, newline='',
              encoding='utf-8') as stream:
        logged = [float(line['seconds']) for line in csv.DictReader(stream)]
    assert trainer['epochs'] == 2 and trainer['epoch_seconds'] == logged and len(logged) == 2
    assert trainer['train_seconds'] == pytest.approx(sum(logged))
    # Each epoch's own seconds fit between the log line before it (the step's
    # start for the first) and its own "Epoch n/2" line.
    (train_step,) = [step for step in row['steps'] if step['name'] == 'train']
    log_path = str(work_dir / 'logs' / 'train.log')
    epoch_lines = scale.log_times(log_path, ' Epoch ')
    assert len(epoch_lines) == 2
    (exported,) = scale.log_times(log_path, 'Exported the SavedModel')
    started = exported + trainer['ranking_and_eval_predictions_seconds'] - train_step['seconds']
    for before, end, seconds in zip([started] + epoch_lines[:-1], epoch_lines, logged):
        assert 0 < seconds <= end - before + _LOG_TICK
    # Refit (the default final model) and posterior averaging both ran; the
    # posterior's span holds the seconds the trainer reports for its sweeps.
    assert trainer['refit_seconds'] > 0 and trainer['export_seconds'] > 0
    assert trainer['ranking_and_eval_predictions_seconds'] > 0
    text = pathlib.Path(log_path).read_text(encoding='utf-8')
    sweeps = float(re.search(r'Posterior mean of \d+ sweeps: .*, ([\d.]+) s$', text,
                             re.MULTILINE).group(1))
    assert sweeps - 0.05 <= trainer['posterior_seconds']
    # The parts add up to the train step's wall time, none of them negative.
    parts = [trainer[key] for key in (
        'train_seconds', 'refit_seconds', 'posterior_seconds', 'export_seconds',
        'ranking_and_eval_predictions_seconds', 'other_seconds')]
    assert min(parts) >= 0
    assert sum(parts) == pytest.approx(train_step['seconds'], abs=1e-6)


def _result(label: str, train: int, seconds: dict[str, float], phases: dict[str, float]) -> dict:
    return {'label': label, 'counts': {'train_ratings': train, 'users': train // 100,
                                       'movies': int(train ** 0.5)},
            'steps': [{'name': name, 'seconds': value} for name, value in seconds.items()],
            'trainer': {'phase_seconds': phases}}


def test_growth_fits_the_exponent_of_each_step_and_phase(tmp_path: pathlib.Path) -> None:
    # Planted: preprocess linear in the ratings, the posterior like their
    # square root, EASE like their 1.5th power; the top-N search only at 25M.
    sizes = {'1m': 800_000, '5m': 4_000_000, '25m': 20_000_000}
    results = [_result(label, n, {'preprocess': 2e-5 * n},
                       {'posterior': 0.01 * n ** 0.5, 'ease': 1e-9 * n ** 1.5,
                        **({'topn_search': 60.0} if label == '25m' else {})})
               for label, n in reversed(sizes.items())]
    rows = {row['name']: row for row in scale.growth_rows(results)}
    assert rows['preprocess']['seconds'] == pytest.approx([16.0, 80.0, 400.0])
    assert rows['preprocess']['exponent'] == pytest.approx(1.0)
    assert rows['posterior']['exponent'] == pytest.approx(0.5)
    assert rows['ease']['exponent'] == pytest.approx(1.5)
    assert rows['topn_search']['seconds'] == [None, None, 60.0]
    assert rows['topn_search']['exponent'] is None
    # The same table from the runs' JSON files, without running anything.
    paths = []
    for index, result in enumerate(results):
        path = tmp_path / f'run{index}.json'
        path.write_text(json.dumps({'results': [result]}))
        paths.append(str(path))
    printed = subprocess.run([sys.executable, 'bench/scale.py', '--growth', *paths], cwd=REPO,
                             capture_output=True, text=True, timeout=60, check=True).stdout
    header, *lines = printed.splitlines()
    assert header.split()[:3] == ['1m', '5m', '25m']
    (ease_line,) = [line for line in lines if line.split()[:2] == ['trainer:', 'ease']]
    assert ease_line.split()[-1] == '1.50'


def test_repeats_report_each_median_and_the_median_run() -> None:
    # Planted: three runs of one size whose chains took 300, 250 and 280 s
    # (median: run 3), and one size run once.
    runs = []
    for run, (preprocess, train) in enumerate([(100.0, 200.0), (90.0, 160.0), (95.0, 185.0)], 1):
        result = _result(f'25m#{run}', 20_000_000, {'preprocess': preprocess, 'train': train},
                         {'posterior': train / 4})
        result.update(size_label='25m', run=run, total_seconds=preprocess + train,
                      eval_rmse=0.778 + run / 1e4, served_ndcg=0.035 + run / 1e4)
        for step in result['steps']:
            step['peak_tree_rss_bytes'] = run << 30
        runs.append(result)
    once = _result('1m', 800_000, {'preprocess': 5.0, 'train': 10.0}, {})
    once['total_seconds'] = 15.0
    chosen = scale.median_runs(runs + [once])
    assert [result['label'] for result in chosen] == ['25m#3', '1m']
    printed = scale.format_medians(runs + [once]).splitlines()
    assert printed[0] == '25m: 3 runs; the median chain is run 3 (280.0 s)'
    rows = {line[:28].strip(): line[28:].split() for line in printed[2:-1]}
    assert rows['preprocess'] == ['100.0', '90.0', '95.0', '95.0']
    assert rows['trainer: posterior'][-1] == '46.2'  # the median of 50, 40 and 46.25
    assert rows['chain'] == ['300.0', '250.0', '280.0', '280.0']
    assert printed[-1] == ('peak memory 3072 MiB (largest step of any run); eval RMSE '
                           '0.7781-0.7783; served NDCG@10 0.0351-0.0353')
    assert '1m' not in '\n'.join(printed)  # one run: nothing to take a median of


def test_growth_refuses_runs_with_it(tmp_path: pathlib.Path) -> None:
    path = tmp_path / 'run.json'
    path.write_text('{"results": []}')
    result = subprocess.run([sys.executable, 'bench/scale.py', '--growth', str(path),
                             '--sizes', '1m'], cwd=REPO, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2 and '--growth with --sizes' in result.stderr.splitlines()[-1]
