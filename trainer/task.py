"""Entry point: flags -> config -> train -> export -> metrics.json -> summary.

    python -m trainer.task --work-dir WORK_DIR [--job-dir MODEL_DIR]
        [--optimizer adam] [--num-epochs 12] [--overwrite] ...

Reads WORK_DIR/transformed/ (written by preprocess.py); writes checkpoints,
loss_log.csv, metrics.json and the SavedModel under the model dir (or to
AIP_CHECKPOINT_DIR / AIP_MODEL_DIR on Vertex AI), TensorBoard scalars to
AIP_TENSORBOARD_LOG_DIR and, in a tuning trial, the validation RMSE to the
hyperparameter-tuning metric file.  In a multi-worker cluster (TF_CONFIG or
CLUSTER_SPEC) every worker runs this; only the chief's outputs are kept.

The run holds its model dir's lock (`trainer.worklock`): a second trainer on
the same model dir stops with one line naming the first.  On SIGTERM (a Spot
VM's preemption) it stops at its next checkpoint and exits 0
(`trainer.shutdown`); the same command resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from trainer import config as config_lib
from trainer import logs
from trainer import shutdown
from trainer import usage
from trainer import worklock

if __name__ == '__main__':
    config_lib.parse_args()  # --help and a bad flag answer before TensorFlow loads
    logs.quiet_startup()

# pylint: disable=wrong-import-position
import tensorflow as tf  # noqa: E402

from trainer import data  # noqa: E402
from trainer import distribute  # noqa: E402
from trainer import features  # noqa: E402
from trainer import phases as phases_lib  # noqa: E402
from trainer import reporting  # noqa: E402
from trainer.ops import kernels  # noqa: E402
from trainer.rating import eval_predictions  # noqa: E402
from trainer.rating import train as train_lib  # noqa: E402
from trainer.serving import export  # noqa: E402
from trainer.topn import catalog as catalog_lib  # noqa: E402
from trainer.topn import ease as ease_lib  # noqa: E402
from trainer.topn import lists as lists_lib  # noqa: E402
from trainer.topn import ranking  # noqa: E402
from trainer.topn import search as topn_search  # noqa: E402
from trainer.topn import train as topn_train  # noqa: E402

logger = logging.getLogger(__name__)


def _metrics_record(result: train_lib.TrainResult, info: features.DatasetInfo,
                    config: config_lib.TrainConfig, export_dir: str,
                    wall_seconds: float, workers: int,
                    replicas: int) -> dict[str, object]:
    final = result.final
    return {
        'dataset': info.dataset,
        'epochs': result.history[-1].epoch if result.history else final.epoch,
        'epochs_this_run': len(result.history) and (
            result.history[-1].epoch - result.initial_epoch),
        'best_epoch': result.best_epoch,
        'stopped_early': result.stopped_early,
        'final_model': 'refit' if result.refit else 'best',
        'validation_rmse': result.best_validation_rmse,
        'eval_rmse': final.eval_rmse,
        'eval_mae': final.eval_mae,
        'train_rmse': final.train_rmse,
        'train_mae': final.train_mae,
        'global_mean_eval_rmse': info.global_mean_eval_rmse,
        'noise_floor_rmse': info.noise_floor_rmse,
        'train_ratings': info.train_ratings,
        'fit_ratings': result.fit_ratings,
        'validation_ratings': result.validation_ratings,
        'eval_ratings': info.eval_ratings,
        'wall_seconds': wall_seconds,
        'train_seconds': result.train_seconds,
        'ratings_per_second': (result.ratings_trained / result.train_seconds
                               if result.train_seconds > 0 else None),
        'posterior': result.posterior,
        'export_dir': export_dir,
        'workers': workers,
        'replicas': replicas,
        'config': dataclasses.asdict(config),
    }


def _selection_line(metrics: dict) -> str:
    if not metrics['validation_ratings']:
        return f'  no validation slice: the model of the last epoch ({metrics["best_epoch"]})'
    chosen = (f'best epoch {metrics["best_epoch"]} by validation RMSE '
              f'{metrics["validation_rmse"]:.4f} on {metrics["validation_ratings"]} '
              'held-out train ratings'
              + (' (stopped early)' if metrics['stopped_early'] else ''))
    if metrics['final_model'] == 'refit':
        return (f'  {chosen}; refit on all {metrics["train_ratings"]} train ratings '
                f'for {metrics["best_epoch"]} epochs')
    return f'  {chosen}; kept its parameters'


def _posterior_line(posterior: dict) -> str:
    noise = ('a noise level per user and per movie' if posterior.get('noise') == 'user-movie'
             else 'one noise level')
    stop, error = '', posterior.get('mc_error')
    if error is not None:
        share = f'Monte Carlo error {100 * error:.3g}% of the validation RMSE'
        level = posterior.get('mc_error_level') or 0.0
        if posterior.get('stopped_by') == 'mc_error':
            stop = f'stopped at {share}, level {100 * level:.3g}%; '
        elif level:
            stop = f'the cap, {share} against a level of {100 * level:.3g}%; '
        else:
            stop = f'{share}; '
    return (f'  then its posterior mean: {posterior["samples"]} Gibbs sweeps after '
            f'{posterior["burn_in"]} burn-in, {noise} ({stop}{posterior["seconds"]:.1f} s); '
            f'the trained model alone scored eval RMSE {posterior["before"]["eval_rmse"]:.4f}')


@dataclasses.dataclass(frozen=True)
class _Lists:
    """The served top-N model and how it was chosen."""
    model: lists_lib.ListModel
    like: ranking.LikeTerm | None
    ials: topn_train.TopNResult | None
    search: topn_search.SearchResult | None
    seconds: float
    # The iALS part's targets ('watched' or 'weighted'); None without one.
    target: str | None = None


def _topn_record(lists: _Lists | None) -> dict[str, object] | None:
    if lists is None:
        return None
    ials = lists.ials
    ndcg = (lists.search.validation_ndcg if lists.search is not None
            else ials.best_validation_ndcg if ials is not None else math.nan)
    return {'model': lists.model.family, **lists_lib.record(lists.model),
            'iterations': None if ials is None else ials.iterations,
            'target': lists.target,
            'refit': True if ials is None else ials.refit,
            'validation_ndcg': None if math.isnan(ndcg) else ndcg, 'seconds': lists.seconds,
            'like': None if lists.like is None else dataclasses.asdict(lists.like),
            'search': None if lists.search is None else lists.search.record()}


def _like_term(weight: float, info: features.DatasetInfo,
               result: train_lib.TrainResult) -> ranking.LikeTerm | None:
    """The rating model's part in the served top-N score, or None (weight 0).

    Its noise is the rating model's validation RMSE (never eval's); with no
    validation slice, 1.
    """
    if not weight:
        return None
    step = features.DATASETS[info.layout].rating_step
    noise = result.best_validation_rmse
    return ranking.LikeTerm(weight=weight, cut=ranking.RELEVANT_RATING - step / 2,
                            noise=noise if math.isfinite(noise) else 1.0)


def _train_lists(config: config_lib.TrainConfig, info: features.DatasetInfo,
                 result: train_lib.TrainResult, sizes: tuple[int, int],
                 phases: phases_lib.PhaseTimes) -> _Lists:
    """Chooses (--topn-search on) and fits the served top-N model on all of train.

    Raises:
      ResumeError: an iALS checkpoint of other shapes is in the way.
    """
    started = time.perf_counter()
    splits = result.splits
    family = 'ials' if config.topn_model == 'auto' else config.topn_model
    blend, like_weight, found = config.topn_blend, config.topn_like_weight, None
    ials_config, lam, dropout = config, config.ease_lambda, config.ease_dropout
    form, exponent = config.ease_form, config.ease_user_exponent
    if config.topn_search == 'on' and len(splits.validation) > 0:
        searched = time.perf_counter()
        found = topn_search.search(config, splits, sizes, info.seed, result.search_model,
                                   _like_term(1.0, info, result))
        # Its validation ranking is a phase of its own (as the top-N training's below).
        phases.add('topn_search', time.perf_counter() - searched - found.validation_seconds)
        phases.add('topn_validation', found.validation_seconds)
        family, blend, like_weight = found.family, found.blend, found.like_weight
        if found.ials is not None:
            ials_config = topn_search.refit_config(config, found)
        if found.ease_lambda is not None:
            lam, dropout, form = found.ease_lambda, found.ease_dropout, found.ease_form
            exponent = found.ease_user_exponent
    elif config.topn_search == 'on':
        logging.getLogger(__name__).info(
            'Top-N search: no validation slice (--validation-percent 0); the flags as given')
    blend = {'ials': 0.0, 'ease': 1.0}.get(family, blend)
    fitted = time.perf_counter()
    ials_result = user_factors = item_factors = stored = seen_values = None
    if family != 'ease':
        ials_result = topn_train.train(ials_config, splits, *(
            size + features.NUM_OOV_BUCKETS for size in sizes), info.seed,
            searched=None if found is None else found.ials_trial)
        user_factors, item_factors = ials_result.user_factors, ials_result.item_factors
    if family != 'ials':
        train = splits.train
        stored = ease_lib.fit(train.user.numpy(), train.item.numpy(), train.rating.numpy(),
                              sizes[0], sizes[1], lam, max_movies=config.ease_max_movies,
                              count=ease_lib.stored_count(config.ease_neighbours, sizes[1]),
                              dropout=dropout, form=form, user_exponent=exponent)
        seen_values = ease_lib.user_values(train.user.numpy(), train.item.numpy(),
                                           train.rating.numpy())
    model = lists_lib.ListModel(family, user_factors, item_factors, stored, seen_values,
                                blend)
    fit_seconds = time.perf_counter() - fitted
    if ials_result is not None:  # the refit's iterations and the validation ranking apart
        fit_seconds -= ials_result.refit_seconds + ials_result.validation_seconds
        phases.add('topn_refit', ials_result.refit_seconds)
        phases.add('topn_validation', ials_result.validation_seconds)
    phases.add('topn_train', fit_seconds)
    return _Lists(model, _like_term(like_weight, info, result), ials_result, found,
                  time.perf_counter() - started,
                  None if ials_result is None else ials_config.topn_target)


def _topn_line(record: dict) -> str:
    validation = ('' if record['validation_ndcg'] is None else
                  f' (best by validation NDCG@{ranking.TOP_K} '
                  f'{record["validation_ndcg"]:.4f})')
    refit = '; refit on all train ratings' if record['refit'] else ''
    like = record.get('like')
    served = ('' if like is None else
              f'; served as log score + {like["weight"]:g} x log P(rating >= '
              f'{ranking.RELEVANT_RATING:g}) (rating model, noise {like["noise"]:.2f})')
    parts = []
    if record.get('factors') is not None:
        parts.append(f'iALS, {record["factors"]} factors, {record["iterations"]} iterations'
                     + (f', {record["target"]} targets' if record.get('target') else ''))
    if record.get('ease_lambda') is not None:
        stored = ('all of B stored' if record.get('ease_dense') else
                  f'{record["ease_neighbours"]} neighbours each')
        settings = ''.join(f', {phrase}' for phrase in config_lib.ease_phrases(
            record.get('ease_dropout'), record.get('ease_user_exponent'),
            record.get('ease_form')))
        parts.append(f'EASE, lambda {record["ease_lambda"]:g}{settings} on '
                     f'{record["ease_movies"]} movies, {stored}')
    model = ' + '.join(parts)
    if record.get('family') == 'blend':
        model = f'a blend (EASE weight {record["blend"]:g}) of {model}'
    search = record.get('search')
    chosen = ('' if not search else
              f'; chosen on validation from {len(search["table"])} points in '
              f'{search["seconds"]:.0f} s')
    return (f'  top-N lists: {model}{validation}{chosen}{refit} ({record["seconds"]:.1f} s)'
            f'{served}')


def _summary(metrics: dict, info: features.DatasetInfo,
             config: config_lib.TrainConfig) -> str:
    lines = [
        f'trainer: {info.train_ratings} train / {info.eval_ratings} eval ratings '
        f'({info.users} users, {info.movies} movies); {metrics["epochs"]} epochs '
        f'({metrics["epochs_this_run"]} this run) in {metrics["wall_seconds"]:.1f} s',
        _selection_line(metrics),
        *([f'  with implicit feedback (--implicit-l2 {config.implicit_l2:g}), folded into '
           'the user factors for export'] if config.implicit_feedback else []),
        *([_posterior_line(metrics['posterior'])] if metrics.get('posterior') else []),
        f'  eval RMSE {metrics["eval_rmse"]:.4f} (MAE {metrics["eval_mae"]:.4f}); '
        f'predicting the train mean: {info.global_mean_eval_rmse:.4f}',
    ]
    if info.noise_floor_rmse is not None:
        lines.append(f'  noise floor {info.noise_floor_rmse:.4f} (eval RMSE is '
                     f'{metrics["eval_rmse"] / info.noise_floor_rmse:.3f}x it)')
    if metrics.get('topn'):
        lines.append(_topn_line(metrics['topn']))
    if 'ranking' in metrics:
        lines.append('  ' + ranking.summary_line(metrics['ranking']))
    if metrics.get('phase_seconds'):
        lines.append('  seconds: ' + phases_lib.summary_text(metrics['phase_seconds'],
                                                            metrics['wall_seconds']))
    lines += [
        f'  export: {metrics["export_dir"]}',
        f'  loss log: {features.join(config.model_dir, features.LOSS_LOG_FILE)}',
        f'  metrics: {features.join(config.model_dir, features.METRICS_FILE)}',
    ]
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Trains and exports; returns the process exit code."""
    logs.setup_logging(verbose=logs.wants_verbose(argv))
    config = config_lib.parse_args(argv)
    started = time.perf_counter()
    try:
        # First: a multi-worker strategy configures the TensorFlow runtime.
        strategy, task = distribute.make_strategy(os.environ)
    except distribute.ClusterError as error:
        print(f'trainer: error: {error}', file=sys.stderr)
        return 2
    with distribute.scratch_dir(task) as scratch, shutdown.stop_at_checkpoints():
        if scratch is not None:
            config = config_lib.redirect_outputs(config, scratch)
        try:
            with worklock.hold(config.model_dir, worklock.command_line(argv)), \
                    usage.sampling(_usage_path(config, task)):
                return _run(config, strategy, task, started)
        except worklock.LockHeld as error:
            print(f'trainer: error: {error}', file=sys.stderr)
            return 2
        except shutdown.Stopped as stopped:
            logger.warning('SIGTERM: %s; exiting 0, run the same command to resume', stopped)
            return 0


def _usage_path(config: config_lib.TrainConfig, task: distribute.Task) -> str | None:
    """The chief's WORK_DIR/usage/trainer.csv (gs:// in the cloud); tuning trials,
    which share a work dir, and the other workers sample nothing."""
    if not task.is_chief or config.metric_only:
        return None
    return features.usage_path(config.work_dir, 'trainer')


# What a run reports in one line and exit code 2 instead of a traceback.
_RUN_ERRORS = (FileNotFoundError, train_lib.ResumeError, train_lib.Unsupported,
               data.ShardError, kernels.KernelUnavailable)


def _or_error_line(info: features.DatasetInfo, work: Callable[[], Any]) -> Any:
    """work(), or None once the run's error is printed in one line (exit code 2).

    tf.data names no file when a shard it reads is broken: the shards are
    read again to find it, and a failure that is not a shard's is re-raised.
    """
    try:
        return work()
    except _RUN_ERRORS as error:
        print(f'trainer: error: {error}', file=sys.stderr)
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError):
        bad_shard = data.find_unreadable_shard((info.train_pattern, info.eval_pattern))
        if bad_shard is None:
            raise
        print(f'trainer: error: {bad_shard}', file=sys.stderr)
    return None


def _run(config: config_lib.TrainConfig, strategy: tf.distribute.Strategy,
         task: distribute.Task, started: float) -> int:
    """Trains, exports and reports on one worker; returns the exit code."""
    tft_dir = features.transformed_dir(config.work_dir)
    info_path = features.join(tft_dir, features.DATASET_INFO_FILE)
    if not tf.io.gfile.exists(info_path):
        print(f'trainer: error: {info_path} does not exist; run '
              f'.venv/bin/python preprocess.py --work-dir {config.work_dir} first',
              file=sys.stderr)
        return 2
    info = features.read_dataset_info(config.work_dir)
    config = config_lib.with_data_defaults(config, info)
    user_vocab_size, item_vocab_size = data.read_vocabulary_sizes(tft_dir)
    if config.metric_only and config.tuning_metric == features.RANKING_METRIC_ID:
        return _ranking_trial(config, info, (user_vocab_size, item_vocab_size), strategy, task)

    def train() -> train_lib.TrainResult:
        with reporting.epoch_summaries(config.tensorboard_dir) as on_epoch_end:
            return train_lib.train(config, info, user_vocab_size, item_vocab_size,
                                   strategy, on_epoch_end, phases)
    phases = phases_lib.PhaseTimes()
    result = _or_error_line(info, train)
    if result is None:
        return 2
    if config.metric_only:
        _report_and_wait(config, result.best_validation_rmse, result.best_epoch, strategy,
                         task)
        if task.is_chief:
            print(f'trial {config.trial_id or 0}: validation RMSE '
                  f'{result.best_validation_rmse:.4f} at epoch {result.best_epoch} '
                  f'(--metric-only: no export)')
        return 0
    try:
        lists = (None if config.topn_model == 'rating' else
                 _train_lists(config, info, result, (user_vocab_size, item_vocab_size),
                              phases))
    except train_lib.ResumeError as error:
        print(f'trainer: error: {error}', file=sys.stderr)
        return 2
    like = None if lists is None else lists.like
    catalog = catalog_lib.load_catalog(config.work_dir, features.DATASETS[info.layout],
                                       train=result.splits.train)
    with phases.phase('export'):
        export_dir = export.export_saved_model(
            result.model, tft_dir, config.export_dir, info.rating_min,
            info.rating_max, catalog=catalog, like=like,
            lists=None if lists is None else lists.model)
    metrics = _metrics_record(result, info, config, export_dir, 0.0, task.num_workers,
                              strategy.num_replicas_in_sync)
    metrics['topn'] = _topn_record(lists)
    served = (None if lists is None else
              lists_lib.scorer(lists.model, catalog.seen(), catalog.num_items, result.model,
                               like))
    with phases.phase('ranking'):
        metrics['ranking'] = ranking.evaluate(result.model, catalog, result.splits.eval,
                                              max_users=config.ranking_users, seed=info.seed,
                                              served=served)
    with phases.phase('eval_predictions'):
        eval_predictions.write_eval_predictions(result.model, info, config.model_dir,
                                                result.splits.eval, config.eval_batch_size)
    # Every phase above is inside the wall time, so they add up to at most it.
    metrics['phase_seconds'] = phases.record()
    metrics['wall_seconds'] = time.perf_counter() - started
    features.write_json(features.join(config.model_dir, features.METRICS_FILE),
                        metrics)
    if config.tuning_metric == features.RANKING_METRIC_ID and lists.ials is not None:
        _report_and_wait(config, lists.ials.best_validation_ndcg, lists.ials.iterations,
                         strategy, task)
    else:
        _report_and_wait(config, result.best_validation_rmse, result.best_epoch, strategy,
                         task)
    if task.is_chief:
        print(_summary(metrics, info, config))
    return 0


def _ranking_trial(config: config_lib.TrainConfig, info: features.DatasetInfo,
                   sizes: tuple[int, int], strategy: tf.distribute.Strategy,
                   task: distribute.Task) -> int:
    """A tuning trial of the top-N model: its search alone, then the metric.

    The rating model is not trained: the top-N model reads only the splits.
    """
    result = _or_error_line(info, lambda: topn_train.train(
        config, train_lib.load_splits(config, info),
        *(size + features.NUM_OOV_BUCKETS for size in sizes), info.seed))
    if result is None:
        return 2
    _report_and_wait(config, result.best_validation_ndcg, result.iterations, strategy, task)
    if task.is_chief:
        print(f'trial {config.trial_id or 0}: validation NDCG@{ranking.TOP_K} '
              f'{result.best_validation_ndcg:.4f} at iteration {result.iterations} '
              f'(--metric-only: no export)')
    return 0


def _report_and_wait(config: config_lib.TrainConfig, value: float, step: int,
                     strategy: tf.distribute.Strategy, task: distribute.Task) -> None:
    """Reports the tuning metric (in a trial), then waits for every worker."""
    if config.hypertune_file is not None:
        reporting.report_tuning_metric(config.hypertune_file, value, step, config.trial_id,
                                       time.time(), config.tuning_metric)
    if task.num_workers > 1:
        distribute.wait_for_all(strategy)


if __name__ == '__main__':
    sys.exit(main())
