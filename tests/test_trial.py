"""A Vertex AI tuning trial: how the trainer finds it and what it skips.

Vertex AI describes a trial in `CLUSTER_SPEC` (`task.trial`) and gives it its
own `AIP_MODEL_DIR`; cloudml-hypertune reads only `CLOUD_ML_TRIAL_ID` and
`CLOUD_ML_HP_METRIC_FILE`.  The trainer honours all three, and with
`--metric-only` (what run-cloud.sh --hp-tuning passes) a trial stops after the
metric: no refit, posterior sweeps, ranking evaluation or export.
"""

from __future__ import annotations

import csv
import json
import os

import pytest

from test_distribute import prepared  # pylint: disable=unused-import  # a small work dir
from trainer import config, distribute, features, history, task

TRAINER_FLAGS = ['--num-epochs', '3', '--batch-size', '257', '--learning-rate', '0.02',
                 '--num-factors', '4', '--ranking-users', '20']
VERTEX_VARIABLES = (distribute.ENV_TF_CONFIG, distribute.ENV_CLUSTER_SPEC,
                    config.ENV_MODEL_DIR, config.ENV_CHECKPOINT_DIR,
                    config.ENV_TENSORBOARD_LOG_DIR, config.ENV_TRIAL_ID,
                    config.ENV_HP_METRIC_FILE)


def cluster_spec(trial: str | None) -> str:
    task_spec = {'type': 'workerpool0', 'index': 0}
    if trial is not None:
        task_spec['trial'] = trial
    return json.dumps({'cluster': {'workerpool0': ['cmle-training-workerpool0-ab-0:2222']},
                       'environment': 'cloud', 'task': task_spec})


@pytest.mark.parametrize('environ, trial_id', [
    ({distribute.ENV_CLUSTER_SPEC: cluster_spec('3')}, '3'),
    ({distribute.ENV_CLUSTER_SPEC: cluster_spec(None)}, None),
    ({distribute.ENV_CLUSTER_SPEC: cluster_spec('3'), config.ENV_TRIAL_ID: '5'}, '5'),
    ({distribute.ENV_CLUSTER_SPEC: 'not json'}, None),
    ({distribute.ENV_CLUSTER_SPEC: '[1, 2]'}, None),
])
def test_the_trial_comes_from_cluster_spec_too(environ: dict, trial_id: str | None):
    parsed = config.parse_args(['--work-dir', 'w'], environ=environ)
    assert parsed.trial_id == trial_id
    assert parsed.hypertune_file == (config.DEFAULT_HP_METRIC_FILE if trial_id else None)


def test_metric_only_turns_off_what_does_not_change_the_metric():
    parsed = config.parse_args(['--work-dir', 'w', '--metric-only'], environ={})
    assert (parsed.metric_only, parsed.final_model, parsed.posterior_samples) == (
        True, 'best', 0)
    assert config.parse_args(['--work-dir', 'w'], environ={}).metric_only is False


def run_trial(prepared: str, root, trial: str, *flags: str) -> dict:
    """task.main as Vertex runs trial `trial`: CLUSTER_SPEC and a per-trial AIP_MODEL_DIR."""
    trial_dir = root / trial
    paths = {'job_dir': str(trial_dir), 'export': str(trial_dir / 'model'),
             'metric_file': str(root / f'metric-{trial}' / 'output.metrics')}
    with pytest.MonkeyPatch.context() as patch:
        for name in VERTEX_VARIABLES:
            patch.delenv(name, raising=False)
        patch.setenv(distribute.ENV_CLUSTER_SPEC, cluster_spec(trial))
        patch.setenv(config.ENV_MODEL_DIR, paths['export'] + '/')
        patch.setenv(config.ENV_HP_METRIC_FILE, paths['metric_file'])
        assert task.main(['--work-dir', prepared, '--job-dir', paths['job_dir'],
                          *TRAINER_FLAGS, *flags]) == 0
    with open(paths['metric_file'], encoding='utf-8') as f:
        (line,) = f.read().splitlines()
    paths['report'] = json.loads(line)
    loss_log = os.path.join(paths['job_dir'], features.LOSS_LOG_FILE)
    paths['loss_log'] = history.read_loss_log(loss_log) if os.path.exists(loss_log) else None
    return paths


def test_a_metric_only_trial_reports_the_same_metric_and_skips_the_rest(
        prepared: str, tmp_path, capsys):
    full = run_trial(prepared, tmp_path, '1')
    assert os.path.exists(os.path.join(full['export'], 'saved_model.pb'))
    trial = run_trial(prepared, tmp_path, '2', '--metric-only')
    assert trial['report']['trial'] == '2'  # from CLUSTER_SPEC alone
    assert full['report']['trial'] == '1'
    # The metric does not depend on what the trial skips.
    assert float(trial['report']['validation_rmse']) == pytest.approx(
        float(full['report']['validation_rmse']), rel=1e-6)
    assert float(trial['report']['validation_rmse']) == pytest.approx(
        min(row.validation_rmse for row in trial['loss_log']), rel=1e-6)
    assert not os.path.exists(trial['export'])
    assert not os.path.exists(os.path.join(trial['job_dir'], features.METRICS_FILE))
    assert 'trial 2: validation RMSE' in capsys.readouterr().out


def test_a_ranking_trial_reports_the_top_n_model_s_validation_ndcg(
        prepared: str, tmp_path, capsys):
    ranking_flags = ('--tuning-metric', 'validation_ndcg', '--topn-iterations', '4')
    full = run_trial(prepared, tmp_path, '1', *ranking_flags)
    assert os.path.exists(os.path.join(full['export'], 'saved_model.pb'))
    trial = run_trial(prepared, tmp_path, '2', '--metric-only', *ranking_flags)
    assert trial['report']['trial'] == '2' and 'validation_rmse' not in trial['report']
    # The search is the same with or without what the trial skips (the refit,
    # the rating model, the export), so the metric is too: the best row of
    # the trial's own topn_log.csv.
    reported = float(trial['report']['validation_ndcg'])
    assert reported == pytest.approx(float(full['report']['validation_ndcg']), rel=1e-6)
    with open(os.path.join(trial['job_dir'], features.TOPN_LOG_FILE), encoding='utf-8') as f:
        rows = list(csv.DictReader(f))
    assert reported == pytest.approx(max(float(row['validation_ndcg']) for row in rows),
                                     abs=1e-6)  # the log keeps 6 decimals
    assert 0 < reported <= 1
    assert trial['report']['global_step'] == str(
        1 + max(range(len(rows)), key=lambda i: float(rows[i]['validation_ndcg'])))
    # Nothing of the rating model, and no export.
    assert trial['loss_log'] is None
    assert not os.path.exists(trial['export'])
    assert not os.path.exists(os.path.join(trial['job_dir'], features.METRICS_FILE))
    assert 'trial 2: validation NDCG@10' in capsys.readouterr().out


def test_the_ranking_metric_needs_the_top_n_model(capsys):
    with pytest.raises(SystemExit):
        config.parse_args(['--work-dir', 'w', '--tuning-metric', 'validation_ndcg',
                           '--topn-model', 'rating'], environ={})
    assert '--topn-model ials' in capsys.readouterr().err
