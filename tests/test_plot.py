"""Tests of plot.py on a tiny hand-written loss log."""

from __future__ import annotations

import json
import os

import pytest

import plot
from trainer import features

ROWS = [
    (1, 1.2, 1.095, 0.9, 1.21, 1.1, 0.93, 1.3, 1.14, 0.95, 0.5),
    (2, 0.9, 0.949, 0.75, 0.98, 0.99, 0.79, 1.0, 1.0, 0.8, 0.4),
    (3, 0.8, 0.894, 0.7, 0.96, 0.98, 0.77, 0.95, 0.975, 0.78, 0.4),
]


def _write_log(model_dir: str, rows=ROWS) -> None:
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, features.LOSS_LOG_FILE), 'w') as f:
        f.write(','.join(features.LOSS_LOG_COLUMNS) + '\n')
        for row in rows:
            f.write(','.join(str(value) for value in row) + '\n')


def test_read_loss_log_reads_every_column(tmp_path):
    _write_log(str(tmp_path))
    log = plot.read_loss_log(str(tmp_path / features.LOSS_LOG_FILE))
    assert log.epochs == [1, 2, 3]
    assert log.columns['eval_rmse'] == pytest.approx([1.14, 1.0, 0.975])
    assert log.columns['train_rmse'] == pytest.approx([1.095, 0.949, 0.894])
    assert log.columns['validation_rmse'] == pytest.approx([1.1, 0.99, 0.98])


def test_main_writes_a_png_titled_with_the_dataset(tmp_path, capsys):
    model_dir = str(tmp_path / 'model')
    _write_log(model_dir)
    with open(os.path.join(model_dir, features.METRICS_FILE), 'w') as f:
        json.dump({'dataset': 'synthetic', 'global_mean_eval_rmse': 1.1,
                   'noise_floor_rmse': 0.8}, f)
    out = tmp_path / 'fig' / 'chart.png'
    assert plot.main(['--model-dir', model_dir, '--out', str(out)]) == 0
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert out.stat().st_size > 10_000
    summary = capsys.readouterr().out
    assert 'read 3 epochs' in summary and '0.9750' in summary


def test_by_default_the_chart_goes_to_the_work_dirs_fig(tmp_path, monkeypatch):
    work_dir = tmp_path / 'work'
    model_dir = str(work_dir / features.MODEL_DIR)
    _write_log(model_dir)
    with open(os.path.join(model_dir, features.METRICS_FILE), 'w') as f:
        json.dump({'dataset': 'synthetic'}, f)
    monkeypatch.chdir(tmp_path)  # neither the checkout nor the current dir

    assert plot.main(['--model-dir', model_dir]) == 0

    assert (work_dir / 'fig' / 'synthetic-loss.png').read_bytes()[:4] == b'\x89PNG'
    assert sorted(path.name for path in tmp_path.iterdir()) == ['work']
    assert plot.default_chart_path('gs://b/run/model', 'ml-1m') == 'fig/ml-1m-loss.png'


def test_main_without_a_log_says_to_train_first(tmp_path, capsys):
    assert plot.main(['--model-dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'trainer.task' in err and 'Traceback' not in err


def test_main_rejects_a_file_that_is_not_a_loss_log(tmp_path, capsys):
    (tmp_path / features.LOSS_LOG_FILE).write_text('a,b\n1,2\n')
    assert plot.main(['--model-dir', str(tmp_path), '--out', str(tmp_path / 'x.png')]) == 2
    assert 'not a loss log' in capsys.readouterr().err


def test_bad_out_flag_gets_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        plot.main(['--model-dir', str(tmp_path), '--out', 'chart.jpg'])
    assert '--out' in capsys.readouterr().err.strip().splitlines()[-1]


RANKING = {'k': 10, 'relevant_rating': 4.0, 'users': 90, 'users_with_relevant': 80,
           'model': {'precision': 0.05, 'recall': 0.04, 'ndcg': 0.06, 'coverage': 0.3},
           'most_popular': {'precision': 0.1, 'recall': 0.09, 'ndcg': 0.12, 'coverage': 0.02},
           'fallback': {'precision': 0.03, 'recall': 0.02, 'ndcg': 0.03, 'coverage': 0.01}}


def _write_eval_predictions(model_dir: str) -> None:
    with open(os.path.join(model_dir, features.EVAL_PREDICTIONS_FILE), 'w') as f:
        f.write(','.join(features.EVAL_PREDICTIONS_COLUMNS) + '\n')
        for rating in (1, 2, 3, 4, 5):
            for low in range(8):  # half-star bins over [1, 5]
                count = max(0, 10 - 4 * abs(low - 2 * (rating - 1)))  # peak at the true rating
                f.write(f'{rating},{1 + low / 2:g},{1.5 + low / 2:g},{count}\n')


@pytest.mark.parametrize('with_predictions, with_ranking', [
    (True, True), (True, False), (False, True)])
def test_main_also_draws_the_eval_chart_from_what_is_there(
        tmp_path, capsys, with_predictions, with_ranking):
    model_dir = str(tmp_path / 'model')
    _write_log(model_dir)
    if with_predictions:
        _write_eval_predictions(model_dir)
    with open(os.path.join(model_dir, features.METRICS_FILE), 'w') as f:
        json.dump({'dataset': 'synthetic', **({'ranking': RANKING} if with_ranking else {})}, f)
    out = tmp_path / 'fig' / 'synthetic-loss.png'
    assert plot.main(['--model-dir', model_dir, '--out', str(out)]) == 0
    eval_chart = tmp_path / 'fig' / 'synthetic-loss-eval.png'
    assert eval_chart.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert out.exists() and f'and {eval_chart}' in capsys.readouterr().out


def test_no_eval_chart_without_its_data(tmp_path, capsys):
    _write_log(str(tmp_path))
    assert plot.main(['--model-dir', str(tmp_path), '--out', str(tmp_path / 'loss.png')]) == 0
    assert sorted(p.name for p in tmp_path.glob('*.png')) == ['loss.png']
    assert ' and ' not in capsys.readouterr().out


def test_read_prediction_counts_keeps_bins_in_order(tmp_path):
    _write_eval_predictions(str(tmp_path))
    table = plot.read_prediction_counts(str(tmp_path / features.EVAL_PREDICTIONS_FILE))
    assert table.ratings == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert table.bin_edges == pytest.approx([1 + i / 2 for i in range(9)])
    assert table.counts[3.0][4] == 10  # true 3 peaks in the bin [3, 3.5)


def test_a_malformed_eval_table_gets_one_line(tmp_path, capsys):
    _write_log(str(tmp_path))
    (tmp_path / features.EVAL_PREDICTIONS_FILE).write_text('rating,count\n1,2\n')
    assert plot.main(['--model-dir', str(tmp_path), '--out', str(tmp_path / 'x.png')]) == 2
    assert 'not an eval prediction table' in capsys.readouterr().err


def test_the_chart_marks_the_trained_and_the_exported_model(tmp_path):
    model_dir = str(tmp_path / 'model')
    _write_log(model_dir)
    with open(os.path.join(model_dir, features.METRICS_FILE), 'w') as f:
        json.dump({'dataset': 'synthetic', 'best_epoch': 3, 'eval_rmse': 0.95,
                   'posterior': {'before': {'eval_rmse': 0.97}}}, f)
    reference = plot.read_reference_lines(model_dir)
    assert (reference['model_eval_rmse'], reference['trained_eval_rmse']) == (0.95, 0.97)
    log = plot.read_loss_log(os.path.join(model_dir, features.LOSS_LOG_FILE))
    figure = plot.draw_loss_chart(log, 'title', best_epoch=3, model_eval_rmse=0.95,
                                  trained_eval_rmse=0.97)
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert 'trained model: eval RMSE 0.9700' in labels
    assert 'exported model: eval RMSE 0.9500' in labels
    # Without posterior averaging there is no second marker.
    with open(os.path.join(model_dir, features.METRICS_FILE), 'w') as f:
        json.dump({'dataset': 'synthetic', 'eval_rmse': 0.95}, f)
    assert plot.read_reference_lines(model_dir)['trained_eval_rmse'] is None


def _record_usage(work_dir: str, step: str) -> None:
    from trainer import usage
    with usage.sampling(features.usage_path(work_dir, step), every_seconds=0.05):
        sum(range(2_000_000))  # some CPU to record


def test_main_draws_the_usage_chart_one_panel_a_step_from_recorded_files(tmp_path, capsys):
    work_dir = str(tmp_path)
    _write_log(os.path.join(work_dir, 'model'))
    for step in ('trainer', 'extract'):
        _record_usage(work_dir, step)
    out = str(tmp_path / 'fig' / 'loss.png')
    assert plot.main(['--model-dir', os.path.join(work_dir, 'model'), '--out', out]) == 0
    usage_png = tmp_path / 'fig' / 'loss-usage.png'
    assert usage_png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert str(usage_png) in capsys.readouterr().out
    from trainer import usage
    figure = plot.draw_usage_chart('t', {step: usage.read_usage(path) for step, path
                                         in usage.recorded_steps(work_dir).items()})
    # In the order the steps run; CPU and memory on two axes of each panel.
    labels = [axes.get_xlabel() for axes in figure.axes]
    assert labels[:2] == ['extract: seconds', 'trainer: seconds'] and len(figure.axes) == 4


def test_no_usage_chart_without_samples_and_a_malformed_one_gets_one_line(tmp_path, capsys):
    _write_log(str(tmp_path / 'model'))
    out = str(tmp_path / 'loss.png')
    assert plot.main(['--model-dir', str(tmp_path / 'model'), '--out', out]) == 0
    assert not (tmp_path / 'loss-usage.png').exists()
    os.makedirs(tmp_path / features.USAGE_DIR)
    (tmp_path / features.USAGE_DIR / 'trainer.csv').write_text('a,b\n1,2\n')
    assert plot.main(['--model-dir', str(tmp_path / 'model'), '--out', out]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and 'trainer.csv is not a usage file' in error[0]
