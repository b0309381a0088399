"""Tests of trainer/config.py: defaults, flags, one-line errors, AIP_* overrides."""

from __future__ import annotations

import dataclasses

import pytest

from trainer import config, features
from trainer.rating import optimizers


def test_defaults_put_everything_under_the_work_dir():
    parsed = config.parse_args(['--work-dir', 'gs://bucket/work'], environ={})
    assert parsed == config.TrainConfig(
        work_dir='gs://bucket/work', model_dir='gs://bucket/work/model',
        checkpoint_dir='gs://bucket/work/model/checkpoints',
        export_dir='gs://bucket/work/model/export')
    assert parsed.optimizer in optimizers.OPTIMIZERS
    assert parsed.overwrite is False


def test_kebab_case_flags_fill_the_fields():
    parsed = config.parse_args([
        '--work-dir', 'w', '--job-dir', 'out', '--optimizer', 'sgd',
        '--learning-rate', '0.5', '--num-factors', '4', '--batch-size', '64',
        '--num-epochs', '3', '--l2', '0', '--l2-bias', '0.2',
        '--init-stddev', '0.01', '--seed', '9', '--validation-percent', '5',
        '--early-stopping-patience', '0', '--l2-frequency-exponent', '0.5',
        '--eval-batch-size', '100', '--posterior-samples', '7',
        '--posterior-burn-in', '2', '--posterior-noise', 'shared', '--overwrite'], environ={})
    assert parsed == config.TrainConfig(
        work_dir='w', model_dir='out', checkpoint_dir='out/checkpoints',
        export_dir='out/export', optimizer='sgd', learning_rate=0.5,
        num_factors=4, batch_size=64, num_epochs=3, l2=0.0, l2_bias=0.2,
        init_stddev=0.01, seed=9, validation_percent=5.0,
        early_stopping_patience=0, l2_frequency_exponent=0.5, eval_batch_size=100,
        posterior_samples=7, posterior_burn_in=2, posterior_noise='shared', overwrite=True)


def test_vertex_environment_moves_export_and_checkpoints():
    environ = {config.ENV_MODEL_DIR: 'gs://b/aip/model',
               config.ENV_CHECKPOINT_DIR: 'gs://b/aip/checkpoints'}
    parsed = config.parse_args(['--work-dir', 'w'], environ=environ)
    assert parsed.export_dir == 'gs://b/aip/model'
    assert parsed.checkpoint_dir == 'gs://b/aip/checkpoints'
    assert parsed.model_dir == features.default_model_dir('w')


def test_empty_environment_values_count_as_unset():
    parsed = config.parse_args(
        ['--work-dir', 'w'], environ={config.ENV_MODEL_DIR: ''})
    assert parsed.export_dir == 'w/model/export'


def test_os_environ_is_read_when_no_mapping_is_given(monkeypatch):
    monkeypatch.setenv(config.ENV_MODEL_DIR, '/tmp/aip-model')
    assert config.parse_args(['--work-dir', 'w']).export_dir == '/tmp/aip-model'


@pytest.mark.parametrize('flag, value', [
    ('--learning-rate', '0'),
    ('--learning-rate', 'fast'),
    ('--learning-rate', 'nan'),
    ('--num-factors', '0'),
    ('--num-factors', '2.5'),
    ('--batch-size', '-8'),
    ('--num-epochs', '0'),
    ('--l2', '-0.1'),
    ('--l2-bias', 'inf'),
    ('--init-stddev', '0'),
    ('--learning-rate-decay', '0'),
    ('--learning-rate-decay', '1.5'),
    ('--seed', '-1'),
    ('--optimizer', 'rmsprop'),
    ('--posterior-samples', '-1'),
    ('--posterior-burn-in', '1.5'),
    ('--posterior-mc-error', '-0.001'),
    ('--posterior-min-samples', '0'),
    ('--posterior-start-scale', '1.5'),
    ('--topn-search', 'maybe'),
    ('--topn-search-seconds', '0'),
    ('--ease-lambda', '-1'),
    ('--ease-dropout', '1'),
    ('--ease-dropout', '-0.1'),
    ('--ease-dropout', 'half'),
    ('--ease-form', 'slim'),
    ('--ease-max-movies', '1'),
    ('--topn-blend', '1.5'),
    ('--topn-model', 'slim'),
])
def test_bad_values_get_one_line_naming_flag_value_and_range(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        config.parse_args(['--work-dir', 'w', flag, value], environ={})
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.splitlines()  # the whole of stderr: no usage block
    assert len(errors) == 1 and 'error:' in errors[0] and '(see --help)' in errors[0]
    assert flag in errors[0] and repr(value) in errors[0]
    assert 'is not a int' not in errors[0]
    if flag not in ('--optimizer', '--topn-search', '--topn-model', '--ease-form'):
        assert 'in [' in errors[0] or 'in (' in errors[0]
        assert f'pass e.g. {flag} ' in errors[0]


@pytest.mark.parametrize('argv', [
    ['--work-dir', 'w', '--num_factors', '4'],  # snake case is not our style
    ['--work-dir', 'w', '--num-fact', '4'],     # no abbreviations
    ['--work-dir', 'w', '--epochs', '4'],
    ['--num-epochs', '4'],                      # --work-dir is required
    ['--work-dir', ''],
])
def test_unknown_missing_or_empty_flags_are_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        config.parse_args(argv, environ={})
    assert exit_info.value.code == 2
    assert 'error:' in capsys.readouterr().err


def _info(layout: str, ratings: int, users: int, movies: int) -> features.DatasetInfo:
    """The DatasetInfo of an 80/20 split of `ratings` synthetic ratings."""
    scale = features.DATASETS[layout]
    return features.DatasetInfo(
        dataset='synthetic', layout=layout, seed=42, eval_percent=20.0,
        rows_read=ratings, rows_accepted=ratings, rows_rejected=0, rejected_by_reason={},
        train_ratings=ratings * 4 // 5, eval_ratings=ratings // 5, users=users,
        movies=movies, train_mean_rating=3.5, global_mean_eval_rmse=1.1,
        rating_min=scale.rating_min, rating_max=scale.rating_max, train_pattern='t',
        eval_pattern='e')


def test_the_default_decay_is_per_800_steps_and_at_most_0_8_an_epoch():
    assert config.default_learning_rate_decay(25_000_000, 1024) == 0.8
    assert config.default_learning_rate_decay(800 * 1024, 1024) == 0.8
    # 80k ratings are 78 steps: a tenth of 800, so 0.8^(78/800).
    assert config.default_learning_rate_decay(80_000, 1024) == pytest.approx(
        0.8 ** (80_000 / 1024 / 800), abs=1e-4)
    info = _info('ml-25m', ratings=12_500_000, users=80_000, movies=40_000)
    filled = config.with_data_defaults(config.make_config(work_dir='w'), info)
    assert filled.learning_rate_decay == 0.8
    kept = config.with_data_defaults(
        config.make_config(work_dir='w', learning_rate_decay=1.0), info)
    assert kept.learning_rate_decay == 1.0


@pytest.mark.parametrize('argv, message', [
    (['--implicit-feedback', '--training-kernel', 'fused'],
     'fused has no implicit-feedback term; use --training-kernel auto or tf'),
    (['--implicit-l2', '0.5'], 'applies only with --implicit-feedback'),
])
def test_implicit_feedback_flags_that_cannot_run_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        config.parse_args(['--work-dir', 'w', *argv], environ={})
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and message in errors[0]


def test_the_implicit_penalty_defaults_to_a_multiple_of_l2():
    info = _info('ml-100k', ratings=100_000, users=943, movies=1682)
    plain = config.with_data_defaults(config.parse_args(['--work-dir', 'w'], {}), info)
    assert plain.implicit_l2 is None and not plain.implicit_feedback
    implicit = config.with_data_defaults(
        config.parse_args(['--work-dir', 'w', '--implicit-feedback'], {}), info)
    assert implicit.implicit_l2 == pytest.approx(config.IMPLICIT_L2_FACTOR * implicit.l2,
                                                 abs=1e-4)
    chosen = config.with_data_defaults(config.parse_args(
        ['--work-dir', 'w', '--implicit-feedback', '--implicit-l2', '0.3', '--l2', '0.1'],
        {}), info)
    assert (chosen.implicit_l2, chosen.l2) == (0.3, 0.1)


def test_config_is_frozen():
    parsed = config.parse_args(['--work-dir', 'w'], environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.num_epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize('environ, hypertune_file', [
    ({}, None),
    ({config.ENV_TRIAL_ID: '4'}, config.DEFAULT_HP_METRIC_FILE),
    ({config.ENV_HP_METRIC_FILE: '/tmp/m/out'}, '/tmp/m/out'),
    ({config.ENV_TRIAL_ID: '', config.ENV_HP_METRIC_FILE: ''}, None),
])
def test_only_a_tuning_trial_reports_a_metric(environ, hypertune_file):
    parsed = config.parse_args(['--work-dir', 'w'], environ=environ)
    assert parsed.hypertune_file == hypertune_file
    assert parsed.trial_id == (environ.get(config.ENV_TRIAL_ID) or None)


def test_tensorboard_dir_comes_from_vertex():
    assert config.parse_args(['--work-dir', 'w'], environ={}).tensorboard_dir is None
    parsed = config.parse_args(['--work-dir', 'w'], environ={
        config.ENV_TENSORBOARD_LOG_DIR: 'gs://b/tb/logs/'})
    assert parsed.tensorboard_dir == 'gs://b/tb/logs/'


def test_a_worker_writes_to_scratch_and_resumes_from_the_chief():
    chief = config.parse_args(['--work-dir', 'w', '--num-factors', '4'], environ={
        config.ENV_CHECKPOINT_DIR: 'gs://b/ckpt', config.ENV_MODEL_DIR: 'gs://b/model',
        config.ENV_TENSORBOARD_LOG_DIR: 'gs://b/tb', config.ENV_TRIAL_ID: '2'})
    worker = config.redirect_outputs(chief, '/tmp/scratch')
    assert worker == dataclasses.replace(
        chief, model_dir='/tmp/scratch/model',
        checkpoint_dir='/tmp/scratch/model/checkpoints',
        export_dir='/tmp/scratch/model/export', tensorboard_dir=None,
        hypertune_file=None, resume_checkpoint_dir='gs://b/ckpt')


def test_the_optimizer_choices_are_the_optimizers():
    """config owns the choice list (so --help needs no TensorFlow); it names the optimisers."""
    assert set(config.OPTIMIZER_NAMES) == set(optimizers.OPTIMIZERS)


def test_help_shows_every_flag_with_a_line_and_its_default():
    """Every flag says what it does; a flag with a default says the default."""
    parser = config.build_parser()
    text = parser.format_help()
    for group in ('the rating model', "the rating model's posterior mean", 'the top-N model'):
        assert f'\n{group}' in text
    for action in parser._actions:  # pylint: disable=protected-access
        if not action.option_strings or action.dest == 'help':
            continue
        assert action.help, f'{action.option_strings[0]} has no help text'
        shown = parser._get_formatter()._get_help_string(action)  # pylint: disable=protected-access
        if action.default not in (None, False):
            assert 'default' in shown, f'{action.option_strings[0]} hides its default'
