"""Tests of plot.py on a tiny hand-written loss log."""

from __future__ import annotations

import json
import os

import pytest

import plot
from trainer import features

ROWS = [
    (1, 1.2, 1.095, 0.9, 1.3, 1.14, 0.95, 0.5),
    (2, 0.9, 0.949, 0.75, 1.0, 1.0, 0.8, 0.4),
    (3, 0.8, 0.894, 0.7, 0.95, 0.975, 0.78, 0.4),
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
