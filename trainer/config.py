"""The trainer's configuration: a frozen dataclass with defaults, and its flags.

`parse_args` is the only place that reads flags or the Vertex AI environment
of a custom job (`AIP_MODEL_DIR`, `AIP_CHECKPOINT_DIR`,
`AIP_TENSORBOARD_LOG_DIR`, and in a tuning trial `CLOUD_ML_TRIAL_ID` /
`CLOUD_ML_HP_METRIC_FILE` or the `trial` of `CLUSTER_SPEC`'s task); the
cluster itself (`TF_CONFIG`, `CLUSTER_SPEC`) is `trainer.distribute`'s.
Every function below `task.main` receives a `TrainConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence

from trainer import distribute
from trainer import features
from trainer import logs

# Vertex AI custom-job environment: where the SavedModel and checkpoints go.
ENV_MODEL_DIR = 'AIP_MODEL_DIR'
ENV_CHECKPOINT_DIR = 'AIP_CHECKPOINT_DIR'
ENV_TENSORBOARD_LOG_DIR = 'AIP_TENSORBOARD_LOG_DIR'
# A hyperparameter-tuning trial: its id, and the file the tuning service reads
# the measurement from (cloudml-hypertune's variables and default path).
ENV_TRIAL_ID = 'CLOUD_ML_TRIAL_ID'
ENV_HP_METRIC_FILE = 'CLOUD_ML_HP_METRIC_FILE'
DEFAULT_HP_METRIC_FILE = '/tmp/hypertune/output.metrics'


# --final-model choices.
FINAL_MODELS = ('refit', 'best')
# --optimizer choices: the keys of `trainer.rating.optimizers.OPTIMIZERS`.
OPTIMIZER_NAMES = ('adagrad', 'adam', 'sgd')
# --posterior-noise choices (`trainer.rating.posterior`), the default first.
POSTERIOR_NOISE_MODELS = ('user-movie', 'shared')
# --topn-model choices: the lists `recommend` serves come from the top-N model
# validation chooses ('auto': EASE, iALS or a blend; iALS with --topn-search
# off), from iALS (`trainer.topn.train`), EASE (`trainer.topn.ease`) or their blend
# (`trainer.topn.lists`), or are ranked by the rating model's predictions.
TOPN_MODELS = ('auto', 'ials', 'ease', 'blend', 'rating')
# --topn-search choices: search the top-N hyperparameters on validation, or not.
TOPN_SEARCH = ('on', 'off')
# --topn-target choices: what a rated pair should score, 1 or g(r) (`trainer.topn.ials`).
TOPN_TARGETS = ('rating', 'watched', 'weighted')
# --ease-form choices: EASE's closed form with diag(B) = 0, or without (`trainer.topn.ease`).
EASE_FORMS = ('ease', 'dlae')
# --training-kernel choices: the fused C++ epoch (`trainer.ops.kernels`) where it
# applies, else TensorFlow ops; the fused one (an error where it cannot run);
# TensorFlow ops.
TRAINING_KERNELS = ('auto', 'fused', 'tf')
# The default L2 is L2_SCALE / (mean train ratings per user and per movie).
L2_SCALE = 8.0
# The default decay: the rate falls by DECAY_FACTOR per DECAY_STEPS steps, at most per epoch.
DECAY_FACTOR = 0.8
DECAY_STEPS = 800
# The default --implicit-l2 is this multiple of --l2 (see `with_data_defaults`).
IMPLICIT_L2_FACTOR = 4.0
# The default --topn-unobserved-weight is UNOBSERVED_MASS / movies (at most 1).
UNOBSERVED_MASS = 2000.0
# The default --topn-l2 is TOPN_L2_SCALE x (mean train ratings per user and per movie)^(2/3).
TOPN_L2_SCALE = 1.3


def ease_phrases(dropout: float | None, user_exponent: float | None,
                 form: str | None) -> list[str]:
    """EASE's settings that differ from plain EASE, as the summary and logs name them:
    ['dropout 0.25', 'user exponent 0.5', 'DLAE form'] (none for p 0, a 0, 'ease')."""
    return ([f'dropout {dropout:g}'] if dropout else []) + (
        [f'user exponent {user_exponent:g}'] if user_exponent else []) + (
        ['DLAE form'] if form == 'dlae' else [])


def default_topn_l2(train_ratings: int, users: int, movies: int) -> float:
    """The ridge --topn-l2 defaults to: stronger the more ratings each row has.

    An empirical fit of where validation and eval NDCG@10 peaked with the other
    defaults (early-stopped iterations, --topn-l2-exponent 0): 20 on generated
    ml-100k-shaped data (66 ratings per row on average), 40 on ml-1m-shaped
    data (174 per row).  On real MovieLens 100k, `implicit`'s ALS in the same
    form was best at 20 (chosen on a validation slice).  About 50 at ml-25m.
    """
    per_row = (train_ratings / max(users, 1) + train_ratings / max(movies, 1)) / 2
    return round(TOPN_L2_SCALE * max(per_row, 1.0) ** (2 / 3), 2)


def default_unobserved_weight(movies: int) -> float:
    """The alpha0 --topn-unobserved-weight defaults to: the same total pull per user.

    Every user's scores of all movies are pulled towards 0 with weight alpha0
    each, so alpha0 x movies is the weight of what a user did not rate, set
    against the few dozen to hundreds of movies they did.  Two tuned points
    agree on about 2,000 for it: iALS on real MovieLens 100k (1,682 movies)
    was best at alpha0 = 1 in `implicit`'s form, and Rendle et al. 2022 chose
    0.1 for their 20,000-movie ML-20M.  So 1.0 at ml-100k, 0.54 at ml-1m,
    0.034 at ml-25m.
    """
    return round(min(1.0, UNOBSERVED_MASS / max(movies, 1)), 4)


def default_l2(train_ratings: int, users: int, movies: int) -> float:
    """The L2 strength --l2 defaults to: weaker the more ratings each row has.

    The penalty is per example, so a row with n ratings is pulled to zero n
    times as hard; a Gaussian prior per row would be the same whatever n.
    Dividing by the mean ratings per row keeps the prior about constant as
    datasets get denser.  L2_SCALE = 8 is where three measurements meet:
    0.12 was best on synthetic ml-100k-shaped data (66 ratings per row on
    average), 0.08 on 1M ml-25m-shaped ratings (95), and Surprise's SVD,
    whose `reg` is the same per-example penalty, tuned to 0.05 on 1M
    ml-1m-shaped ratings (174).
    """
    per_row = (train_ratings / max(users, 1) + train_ratings / max(movies, 1)) / 2
    return round(L2_SCALE / max(per_row, 1.0), 4)


def default_learning_rate_decay(train_ratings: int, batch_size: int) -> float:
    """The per-epoch factor --learning-rate-decay defaults to.

    The rate falls by DECAY_FACTOR every DECAY_STEPS steps, but by no more
    than that per epoch: 0.8 an epoch once the train split is 800 batches
    (about 0.8M ratings at batch 1024), gentler on small data, where an
    epoch is a few dozen steps and the model needs a dozen epochs.  Measured
    on the rank-3 generator's data (--synthetic-model rank3, commit fbd2760;
    eval RMSE, refit): 1M ml-1m-shaped ratings 0.8810 -> 0.8776, 5M
    ml-25m-shaped 0.8555 -> 0.8516 (floor 0.8254) in the same time; 100k
    0.9160 -> 0.9154.  Decaying 0.8 an epoch at 100k stopped it short of
    converging (0.951), which is why the decay is counted in steps.
    """
    steps = train_ratings / max(batch_size, 1)  # the train split's, so a refit decays alike
    return round(DECAY_FACTOR ** min(1.0, steps / DECAY_STEPS), 4)


def with_data_defaults(config: 'TrainConfig', info: features.DatasetInfo) -> 'TrainConfig':
    """The config with the data-dependent defaults (None fields) filled in."""
    filled = {}
    if config.l2 is None:
        filled['l2'] = default_l2(info.train_ratings, info.users, info.movies)
    if config.learning_rate_decay is None:
        filled['learning_rate_decay'] = default_learning_rate_decay(
            info.train_ratings, config.batch_size)
    if config.implicit_feedback and config.implicit_l2 is None:
        # Measured on the rank-3 generator's synthetic 100k (commit c52341e,
        # docs/evaluation.md; eval RMSE of the exported model; plain
        # MF 0.9065 without and 0.8397 with selection bias 2): 1x l2 0.9302
        # and 0.8341, 2x 0.9226 and 0.8331, 4x 0.9151 and 0.8319, 16x
        # 0.9092 and 0.8341.  Where who rates what carries no taste the y
        # rows can only fit noise, so they need more shrinkage than factors.
        filled['implicit_l2'] = round(
            IMPLICIT_L2_FACTOR * filled.get('l2', config.l2), 4)
    if config.topn_unobserved_weight is None:
        filled['topn_unobserved_weight'] = default_unobserved_weight(info.movies)
    if config.topn_l2 is None:
        filled['topn_l2'] = default_topn_l2(info.train_ratings, info.users, info.movies)
    return dataclasses.replace(config, **filled) if filled else config


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs.

    Defaults were chosen on synthetic ml-100k-shaped data (100k ratings,
    80/20 split); what they score there, against Surprise's SVD and the
    noise floor, is the README's quality table, and how each was chosen is
    in docs/model.md.  On the earlier rank-3 generator's data
    (--synthetic-model rank3, commit 1ff16c4) exact alternating least
    squares on the L2 objective got no closer to the noise floor (1.066x)
    than the trained model (1.07x), so the trained model's gap was the
    objective's, not the optimiser's; 8 or 32 factors, batch 256, more
    epochs or a lower learning rate all stayed at 1.07-1.08x there.

    Attributes:
      work_dir: the pipeline work dir (reads WORK_DIR/transformed/).
      model_dir: checkpoints (unless checkpoint_dir), loss log, metrics.
      checkpoint_dir: where tf.train.CheckpointManager writes.
      export_dir: where the SavedModel goes.
      optimizer: one of OPTIMIZER_NAMES.
      learning_rate: the optimiser's step size.
      learning_rate_decay: epoch n steps with learning_rate * decay^(n - 1);
        None: scaled to the data by `default_learning_rate_decay`.
      num_factors: length of each user and item factor row.
      batch_size: ratings per step (the global batch across replicas).
      num_epochs: the most epochs, counting those restored from a checkpoint
        (fewer if early stopping ends the run).
      l2: per-example L2 strength on the touched factor rows; None: scaled
        to the data by `default_l2`.
      l2_bias: per-example L2 strength on the touched biases.
      init_stddev: standard deviation of the initial factors.
      seed: seeds the initial factors and each epoch's shuffle.
      validation_percent: the share of the train split set aside (by a
        seeded permutation) to choose the epoch and stop early; 0 trains on
        all of it for num_epochs.
      early_stopping_patience: stop after this many epochs without a
        validation improvement; 0 never stops early.
      l2_frequency_exponent: alpha of the per-row penalty weights n^-alpha
        (n = the row's train ratings, mean weight 1): 0 penalises per
        example as Surprise's SVD does, 1 once per row.
      final_model: 'refit' trains a fresh model on the whole train split
        (validation slice included) for the best epoch's number of epochs;
        'best' keeps the best epoch's parameters as they are.
      implicit_feedback: add the SVD++-style term (`trainer.rating.model`): each
        user's factors gain a learned sum over the movies they rated; trained
        in TensorFlow ops on one replica, folded into the user factors at the
        end.
      implicit_l2: the penalty strength of the implicit term's y rows; None:
        IMPLICIT_L2_FACTOR x l2 (with implicit_feedback).
      posterior_samples: the most Gibbs sweeps averaged into the final
        model's posterior mean (`trainer.rating.posterior`); 0 exports the
        trained (MAP) model as it is.
      posterior_mc_error: the chain stops at the first kept sweep (from
        posterior_min_samples on) where the Monte Carlo error's estimated
        share of the validation RMSE is at most this (0.001: 0.1%); 0 runs all
        posterior_samples; None (the default): 0.001 from 500,000 train
        ratings on, else 0 (`posterior.default_chain`).  Trust it from the
        trained model's start (posterior_start_scale 1): from shrunk factors
        the chain can sit on a plateau before it climbs, which no rule can see
        coming.
      posterior_min_samples: the fewest sweeps averaged when the rule stops
        the chain.
      posterior_start_scale: the chain starts from the trained factors times
        this (1: the trained model itself); None (the default): 1 from 500,000
        train ratings on, else 0.3.
      posterior_burn_in: sweeps run from the trained model and dropped
        before the averaged ones.
      posterior_noise: the chain's noise model, 'user-movie' (a noise level
        per user and per movie) or 'shared' (one for every rating).
      topn_model: the served lists' model: 'auto' (validation picks EASE,
        iALS or their blend; iALS with topn_search 'off'), 'ials'
        (`trainer.topn.ials`), 'ease' (`trainer.topn.ease`), 'blend' (`trainer.topn.lists`),
        or 'rating': rank by predicted rating.
      topn_search: 'on' searches the top-N hyperparameters on the validation
        slice and refits the best on all of train (`trainer.topn.search`);
        'off' trains the topn_* and ease_* flags as given.
      topn_search_seconds: the search's time budget; None: grows with the
        train ratings (`topn_search.default_budget`).
      ease_lambda: EASE's ridge lambda (the search's first rung).
      ease_dropout: EDLAE's dropout probability p in [0, 1): each movie's
        penalty grows by p / (1 - p) times its Gram diagonal (`trainer.topn.ease`);
        0 is EASE.  The search starts there (0.25: generated data's best at
        100k and 1M) and chooses p on validation.
      ease_user_exponent: a in each user's weight (ratings / mean ratings per
        user)^-a in EASE's fit (`trainer.topn.ease`); 0 is EASE's unweighted sum.
        The search starts there (0.5: generated data's best) and chooses a on
        validation.
      ease_form: 'ease' (B's diagonal held at 0 while fitting: EASE, EDLAE) or
        'dlae' (the denoising autoencoder, unconstrained; `trainer.topn.ease`).
        The search tries both at every point.
      ease_max_movies: EASE keeps at most this many movies, the most rated.
      ease_neighbours: neighbours stored per movie for serving; 0: all of B
        (dense) up to `ease.DENSE_MAX_MOVIES` catalogue movies, else 200.
      topn_blend: EASE's weight in a blend of standardised scores.
      topn_factors: factors per user and movie of the top-N model.
      topn_l2: its ridge penalty, per row l2 * (n + alpha0 * other side)^nu;
        None: scaled to the data by `default_topn_l2`.
      topn_l2_exponent: nu of that penalty (0, the default: the same for every
        row; Rendle et al. 2022 use 1).
      topn_unobserved_weight: alpha0, the weight pulling every pair to 0;
        None: UNOBSERVED_MASS / movies (`default_unobserved_weight`).
      topn_confidence: the exponent a of a rated pair's weight max(r - 2, 0.2)^a
        (0, the default: every rating weighs alike, the model learns who
        watches what and the like term adds how they rate).
      topn_target: what a rated pair should score: 'rating', max(r - 2, 0.2),
        so a disliked movie counts as nearly unrated; 'watched', 1; 'weighted',
        1 with weight alpha0 (1 + g^confidence), Hu et al.'s (`trainer.topn.ials`).
      topn_iterations: the most alternating iterations (fewer when validation
        NDCG@10 stops improving for early_stopping_patience iterations).
      topn_cg_steps: conjugate-gradient steps per half-iteration.
      topn_init_stddev: scale of its initial factors.
      topn_like_weight: beta: the served top-N score is log(p_u . q_i) +
        beta * log P(rating >= 4) by the rating model (`ranking.topn_scores`);
        0 serves p_u . q_i alone (then topn_confidence 1 serves better).
      eval_batch_size: ratings per batch when computing metrics.
      ranking_users: rank a sample of this many eval users (seeded by the
        split seed) when there are more; 0 ranks all.
      epoch_eval_ratings: after each epoch, score at most this many eval
        ratings (a seeded sample, keyed by the split seed, when there are
        more; validation is always scored in full); 0 scores all.  The final
        model is scored on the whole eval split.
      topn_validation_users: rank at most this many validation users after
        each top-N iteration (a seeded sample, keyed by the split seed; also
        capped at `trainer.topn.train.VALIDATION_CELLS` users x movies);
        0: as many as ranking_users.
      training_kernel: 'fused' trains each epoch in one C++ op
        (`trainer.ops.kernels`: one replica, Adam), 'tf' in TensorFlow ops (and
        draws the posterior sweeps in numpy), 'auto' with the C++ ops where
        they apply and build, else as 'tf'.
      overwrite: clear model_dir (and checkpoint_dir) first instead of resuming.
      tensorboard_dir: where per-epoch TensorBoard scalars go; None: nowhere.
      hypertune_file: where the tuning metric is reported; None outside a
        tuning trial.
      trial_id: the tuning trial, if any.
      metric_only: train and report the validation metric only: no refit, no
        posterior sweeps, no ranking evaluation, no export (a tuning trial
        whose service reads only the metric).
      tuning_metric: what a tuning trial reports (features.TUNING_METRICS):
        the rating model's validation_rmse, or the top-N model's
        validation_ndcg (with metric_only, the rating model is not trained).
      resume_checkpoint_dir: resume from the checkpoints here instead of
        checkpoint_dir (a non-chief worker resumes from the chief's).
    """
    work_dir: str
    model_dir: str
    checkpoint_dir: str
    export_dir: str
    optimizer: str = 'adam'
    learning_rate: float = 0.005
    learning_rate_decay: float | None = None
    num_factors: int = 16
    batch_size: int = 1024
    num_epochs: int = 40
    l2: float | None = None
    l2_bias: float = 0.01
    init_stddev: float = 0.1
    seed: int = 0
    validation_percent: float = 10.0
    early_stopping_patience: int = 3
    l2_frequency_exponent: float = 0.0
    final_model: str = 'refit'
    implicit_feedback: bool = False
    implicit_l2: float | None = None
    posterior_samples: int = 100
    posterior_burn_in: int = 20
    posterior_mc_error: float | None = None
    posterior_min_samples: int = 20
    posterior_start_scale: float | None = None
    posterior_noise: str = POSTERIOR_NOISE_MODELS[0]
    topn_model: str = 'auto'
    topn_search: str = 'on'
    topn_search_seconds: float | None = None
    ease_lambda: float = 800.0
    ease_dropout: float = 0.25
    ease_form: str = 'ease'
    ease_user_exponent: float = 0.5
    ease_max_movies: int = 5_000
    ease_neighbours: int = 0
    topn_blend: float = 0.5
    topn_factors: int = 64
    topn_l2: float | None = None
    topn_l2_exponent: float = 0.0
    topn_unobserved_weight: float | None = None
    topn_confidence: float = 0.0
    topn_target: str = 'watched'
    topn_iterations: int = 20
    topn_cg_steps: int = 3
    topn_init_stddev: float = 0.1
    topn_like_weight: float = 0.25
    eval_batch_size: int = 65536
    ranking_users: int = 20_000
    epoch_eval_ratings: int = 500_000
    topn_validation_users: int = 5_000
    training_kernel: str = 'auto'
    overwrite: bool = False
    tensorboard_dir: str | None = None
    hypertune_file: str | None = None
    trial_id: str | None = None
    metric_only: bool = False
    tuning_metric: str = features.TUNING_METRIC_ID
    resume_checkpoint_dir: str | None = None


def make_config(work_dir: str, model_dir: str | None = None,
                environ: Mapping[str, str] | None = None,
                **hyperparameters: object) -> TrainConfig:
    """Resolves the output directories and builds a TrainConfig.

    Args:
      work_dir: the pipeline work dir.
      model_dir: the --job-dir; None means WORK_DIR/model.
      environ: the environment to read AIP_* and CLOUD_ML_* from; None means
        none set.
      **hyperparameters: other TrainConfig fields.

    Returns:
      The config, with checkpoint_dir = AIP_CHECKPOINT_DIR or
      MODEL_DIR/checkpoints, export_dir = AIP_MODEL_DIR or MODEL_DIR/export,
      tensorboard_dir = AIP_TENSORBOARD_LOG_DIR, and, in a tuning trial
      (CLOUD_ML_TRIAL_ID, CLOUD_ML_HP_METRIC_FILE or CLUSTER_SPEC's task.trial
      set), hypertune_file = CLOUD_ML_HP_METRIC_FILE or
      /tmp/hypertune/output.metrics.
    """
    environ = environ or {}
    model_dir = model_dir or features.default_model_dir(work_dir)
    trial_id = environ.get(ENV_TRIAL_ID) or cluster_spec_trial(
        environ.get(distribute.ENV_CLUSTER_SPEC))
    in_trial = trial_id is not None or bool(environ.get(ENV_HP_METRIC_FILE))
    return TrainConfig(
        work_dir=work_dir,
        model_dir=model_dir,
        checkpoint_dir=(environ.get(ENV_CHECKPOINT_DIR)
                        or features.join(model_dir, features.CHECKPOINT_DIR)),
        export_dir=(environ.get(ENV_MODEL_DIR)
                    or features.join(model_dir, features.EXPORT_DIR)),
        tensorboard_dir=environ.get(ENV_TENSORBOARD_LOG_DIR) or None,
        hypertune_file=((environ.get(ENV_HP_METRIC_FILE)
                         or DEFAULT_HP_METRIC_FILE) if in_trial else None),
        trial_id=trial_id,
        **hyperparameters)


def cluster_spec_trial(cluster_spec: str | None) -> str | None:
    """The trial id in Vertex AI's CLUSTER_SPEC ({"task": {"trial": "3", ...}}), or None.

    A CLUSTER_SPEC that is not a JSON object gives None here; trainer.distribute
    reports it when it builds the cluster.
    """
    try:
        task = json.loads(cluster_spec or '{}').get('task')
    except (json.JSONDecodeError, AttributeError):
        return None
    trial = task.get('trial') if isinstance(task, dict) else None
    return str(trial) if trial not in (None, '') else None


def redirect_outputs(config: TrainConfig, scratch_dir: str) -> TrainConfig:
    """The config of a non-chief worker: the same training, outputs in scratch_dir.

    Every worker of a multi-worker run trains and saves (checkpoints and the
    export are collective), but only the chief's outputs are real.  A worker
    writes its copies under scratch_dir, writes no TensorBoard events and
    reports no tuning metric, and resumes from the chief's checkpoints.
    """
    model_dir = features.join(scratch_dir, features.MODEL_DIR)
    return dataclasses.replace(
        config, model_dir=model_dir,
        checkpoint_dir=features.join(model_dir, features.CHECKPOINT_DIR),
        export_dir=features.join(model_dir, features.EXPORT_DIR),
        tensorboard_dir=None, hypertune_file=None,
        resume_checkpoint_dir=config.checkpoint_dir)


# How a bad value's error names the type it wanted.
_KIND_NAMES = {'int': 'an integer', 'float': 'a number'}


def _bounded(kind: Callable[[str], float], flag: str, low: float, high: float,
             low_inclusive: bool = True,
             typical: float | None = None,
             high_inclusive: bool = True) -> Callable[[str], float]:
    """An argparse `type` that accepts kind(text) in [low, high] (or with either end open).

    The error suggests the flag's default, or for a data-dependent default
    (None) `typical`, else a value near low.
    """
    opening = '[' if low_inclusive else '('
    allowed = f'{opening}{low:g}, {high:g}{"]" if high_inclusive else ")"}'
    default = getattr(TrainConfig, flag[2:].replace('-', '_'))
    if default is not None:
        example = f'{flag} {default} (the default)'
    else:
        example = f'{flag} {typical if typical is not None else low + (high - low) / 1000:g}'

    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        in_range = value is not None and math.isfinite(value) and (
            low <= value if low_inclusive else low < value) and (
            value <= high if high_inclusive else value < high)
        if not in_range:
            raise argparse.ArgumentTypeError(
                f'{text!r} is not {_KIND_NAMES.get(kind.__name__, kind.__name__)} in '
                f'{allowed}; pass e.g. {example}')
        return value

    convert.__name__ = kind.__name__
    return convert


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default where its help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        if ('default' not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings):
            text += ' (default: %(default)s)'
        return text


class _Parser(argparse.ArgumentParser):
    """Answers a bad flag in one line (no 35-line usage block), naming --help."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags, grouped by what they steer; names are kebab-case TrainConfig fields."""
    parser = _Parser(
        prog='python -m trainer.task', usage='%(prog)s --work-dir WORK_DIR [flags]',
        allow_abbrev=False, formatter_class=_HelpFormatter,
        description='Trains the rating model (biased matrix factorisation, then its '
                    'posterior mean) and the top-N model on the TFT output of '
                    'preprocess.py, and exports one SavedModel that serves both.')
    _add_run_flags(parser.add_argument_group('the run'))
    _add_rating_flags(parser.add_argument_group(
        'the rating model (biased matrix factorisation, trained with minibatch SGD-family optimisers)'))
    _add_posterior_flags(parser.add_argument_group(
        "the rating model's posterior mean (Gibbs sweeps from the trained model, averaged)"))
    _add_topn_flags(parser.add_argument_group(
        'the top-N model (the lists `recommend` serves)'))
    _add_tuning_flags(parser.add_argument_group('hyperparameter tuning trials'))
    return parser


def _add_run_flags(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add('--work-dir', required=True,
        help='work dir holding transformed/ (local path or gs://)')
    add('--job-dir', default=None,
        help='model dir: checkpoints, loss log, metrics, export '
             '(default: WORK_DIR/model)')
    add('--seed', default=TrainConfig.seed,
        type=_bounded(int, '--seed', 0, 2**31 - 1),
        help='seed of the initial factors, the validation slice and the samples')
    add('--validation-percent', default=TrainConfig.validation_percent,
        type=_bounded(float, '--validation-percent', 0, 50),
        help='share of the train split held out to pick the epoch and stop '
             'early (0: none, train --num-epochs on all of it)')
    add('--final-model', default=TrainConfig.final_model, choices=FINAL_MODELS,
        help='refit: retrain on all train ratings for the best epoch count; '
             'best: keep the best epoch as trained')
    add('--ranking-users', default=TrainConfig.ranking_users,
        type=_bounded(int, '--ranking-users', 0, 1 << 31),
        help='rank a seeded sample of this many eval users when there are more '
             '(0: all); ranking 162k users takes about 25 s')
    add('--epoch-eval-ratings', default=TrainConfig.epoch_eval_ratings,
        type=_bounded(int, '--epoch-eval-ratings', 0, 1 << 31),
        help='score a seeded sample of this many eval ratings after each epoch when '
             'there are more (0: all); validation and the final model are scored on all')
    add('--eval-batch-size', default=TrainConfig.eval_batch_size,
        type=_bounded(int, '--eval-batch-size', 1, 1 << 20),
        help='ratings per batch when scoring validation and eval')
    add('--training-kernel', default=TrainConfig.training_kernel,
        choices=TRAINING_KERNELS,
        help='fused: each epoch is one C++ op (built once with g++; one replica, '
             'adam); tf: TensorFlow ops; auto: fused where it applies')
    add('--overwrite', action='store_true',
        help='clear the model dir and start fresh instead of resuming')
    logs.add_verbose_flag(group)


def _add_rating_flags(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add('--optimizer', default=TrainConfig.optimizer, choices=OPTIMIZER_NAMES,
        help='the minibatch optimiser (lazy: it updates only the rows a batch touches)')
    add('--learning-rate', default=TrainConfig.learning_rate,
        type=_bounded(float, '--learning-rate', 0, 10, low_inclusive=False),
        help="the optimiser's initial step size")
    add('--learning-rate-decay', default=TrainConfig.learning_rate_decay,
        type=_bounded(float, '--learning-rate-decay', 0, 1, low_inclusive=False,
                      typical=DECAY_FACTOR),
        help='each epoch multiplies the learning rate by this (1: constant; default: '
             f'{DECAY_FACTOR:g} per {DECAY_STEPS} steps, at most per epoch)')
    add('--num-factors', default=TrainConfig.num_factors,
        type=_bounded(int, '--num-factors', 1, 1024),
        help='latent factors per user and per movie')
    add('--batch-size', default=TrainConfig.batch_size,
        type=_bounded(int, '--batch-size', 1, 1 << 20),
        help='ratings per minibatch (across all workers)')
    add('--num-epochs', default=TrainConfig.num_epochs,
        type=_bounded(int, '--num-epochs', 1, 10_000),
        help='the most epochs; validation RMSE stops earlier')
    add('--early-stopping-patience', default=TrainConfig.early_stopping_patience,
        type=_bounded(int, '--early-stopping-patience', 0, 10_000),
        help='epochs without a validation improvement before stopping (0: never)')
    add('--l2', default=TrainConfig.l2, type=_bounded(float, '--l2', 0, 100),
        help='per-example L2 strength on factor rows (default: '
             f'{L2_SCALE:g} / the mean train ratings per user and per movie)')
    add('--l2-bias', default=TrainConfig.l2_bias,
        type=_bounded(float, '--l2-bias', 0, 100),
        help='per-example L2 strength on biases')
    add('--l2-frequency-exponent', default=TrainConfig.l2_frequency_exponent,
        type=_bounded(float, '--l2-frequency-exponent', 0, 1),
        help='penalty weight n^-alpha of a row with n ratings (0: per example)')
    add('--init-stddev', default=TrainConfig.init_stddev,
        type=_bounded(float, '--init-stddev', 0, 10, low_inclusive=False),
        help='standard deviation of the initial factors')
    add('--implicit-feedback', action='store_true',
        help="SVD++-style term: learn from which movies each user rated, not only "
             'how (one replica, TensorFlow ops: 10 s of training instead of 0.5 s at 100k)')
    add('--implicit-l2', default=TrainConfig.implicit_l2,
        type=_bounded(float, '--implicit-l2', 0, 100),
        help='per-example L2 strength on the implicit rows, spread over the movies '
             f'each user rated (default: {IMPLICIT_L2_FACTOR:g} x --l2)')


def _add_posterior_flags(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add('--posterior-samples', default=TrainConfig.posterior_samples,
        type=_bounded(int, '--posterior-samples', 0, 100_000),
        help='the most Gibbs sweeps averaged into the exported model (its Bayesian '
             'posterior mean); 0: export the trained model as it is')
    add('--posterior-mc-error', default=TrainConfig.posterior_mc_error,
        type=_bounded(float, '--posterior-mc-error', 0, 1),
        help="stop averaging once the Monte Carlo error's estimated share of the "
             'validation RMSE is at most this, e.g. 0.001 (0.1%%) with '
             '--posterior-start-scale 1; 0: run all --posterior-samples (default: '
             '0.001 from 500,000 train ratings on, else 0)')
    add('--posterior-min-samples', default=TrainConfig.posterior_min_samples,
        type=_bounded(int, '--posterior-min-samples', 1, 100_000),
        help='the fewest sweeps averaged when --posterior-mc-error stops the chain')
    add('--posterior-start-scale', default=TrainConfig.posterior_start_scale,
        type=_bounded(float, '--posterior-start-scale', 0, 1),
        help="the chain starts from the trained factors times this; 1: from the "
             'trained model itself (default: 1 from 500,000 train ratings on, else 0.3; '
             'docs/performance.md#how-many-sweeps says why)')
    add('--posterior-burn-in', default=TrainConfig.posterior_burn_in,
        type=_bounded(int, '--posterior-burn-in', 0, 100_000),
        help='sweeps from the trained model dropped before averaging')
    add('--posterior-noise', default=TrainConfig.posterior_noise,
        choices=POSTERIOR_NOISE_MODELS,
        help='user-movie: the chain learns a noise level per user and per '
             'movie, so erratic raters and divisive movies weigh less; shared: one '
             'noise level for every rating')


def _add_topn_flags(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add('--topn-model', default=TrainConfig.topn_model, choices=TOPN_MODELS,
        help='auto (default): validation picks EASE, iALS or their blend (iALS with '
             '--topn-search off); ials, ease, blend: that model; rating: rank by '
             'predicted rating')
    add('--topn-search', default=TrainConfig.topn_search, choices=TOPN_SEARCH,
        help='on (default): search the top-N hyperparameters on the validation slice '
             'within a time budget and refit the best; off: train the flags as given')
    add('--topn-search-seconds', default=TrainConfig.topn_search_seconds,
        type=_bounded(float, '--topn-search-seconds', 0, 86_400, low_inclusive=False,
                      typical=30),
        help='the search\'s time budget (default: 30 s x (train ratings / 100k)^0.25, '
             'at most 53 s: past 1M ratings it searches a sample of the users)')
    add('--ease-lambda', default=TrainConfig.ease_lambda,
        type=_bounded(float, '--ease-lambda', 0, 1e8, low_inclusive=False),
        help="EASE's ridge lambda (the search starts there)")
    add('--ease-dropout', default=TrainConfig.ease_dropout,
        type=_bounded(float, '--ease-dropout', 0, 1, high_inclusive=False),
        help="EDLAE's dropout probability p in [0, 1): each movie's penalty grows by "
             'p / (1 - p) x its Gram diagonal; 0: EASE (default 0.25; the search starts '
             'there and chooses p on validation)')
    add('--ease-user-exponent', default=TrainConfig.ease_user_exponent,
        type=_bounded(float, '--ease-user-exponent', 0, 4),
        help="a in each user's weight in EASE's fit, (ratings / mean ratings per user)^-a: "
             '0 weighs users as plain EASE, 1 weighs every user alike (default 0.5; the '
             'search starts there and chooses a on validation)')
    add('--ease-form', default=TrainConfig.ease_form, choices=EASE_FORMS,
        help="'ease' (default): B's diagonal held at 0 while fitting (EASE; EDLAE with "
             "dropout); 'dlae': the denoising autoencoder without that constraint "
             '(the search tries both)')
    add('--ease-max-movies', default=TrainConfig.ease_max_movies,
        type=_bounded(int, '--ease-max-movies', 2, 50_000),
        help='EASE keeps the most-rated movies up to this many (a dense movies^2 '
             'inverse: 400 MB at 5,000)')
    add('--ease-neighbours', default=TrainConfig.ease_neighbours,
        type=_bounded(int, '--ease-neighbours', 0, 50_000),
        help='EASE neighbours stored per movie in the export; 0 (default): all of '
             'them, a dense movies^2 matrix, up to 4,096 movies, else 200')
    add('--topn-blend', default=TrainConfig.topn_blend,
        type=_bounded(float, '--topn-blend', 0, 1),
        help="EASE's weight in --topn-model blend (scores standardised per user)")
    add('--topn-factors', default=TrainConfig.topn_factors,
        type=_bounded(int, '--topn-factors', 1, 1024),
        help='latent factors per user and per movie of the top-N model')
    add('--topn-l2', default=TrainConfig.topn_l2,
        type=_bounded(float, '--topn-l2', 0, 1e6, typical=20),
        help='ridge penalty of a top-N factor row: this x (its ratings + '
             '--topn-unobserved-weight x the other side\'s rows)^--topn-l2-exponent '
             f'(default: {TOPN_L2_SCALE:g} x the mean train ratings per user and per '
             'movie to the power 2/3)')
    add('--topn-l2-exponent', default=TrainConfig.topn_l2_exponent,
        type=_bounded(float, '--topn-l2-exponent', 0, 2),
        help='how the ridge penalty grows with a row\'s weight (0: the same for every row)')
    add('--topn-unobserved-weight', default=TrainConfig.topn_unobserved_weight,
        type=_bounded(float, '--topn-unobserved-weight', 0, 1e4, low_inclusive=False,
                      typical=0.5),
        help='weight pulling the score of every user-movie pair towards 0 (default: '
             f'{UNOBSERVED_MASS:g} / the movies, at most 1)')
    add('--topn-confidence', default=TrainConfig.topn_confidence,
        type=_bounded(float, '--topn-confidence', 0, 10),
        help='a rated pair weighs max(rating - 2, 0.2) to this power (default 0: all alike; '
             '1 with --topn-like-weight 0)')
    add('--topn-target', default=TrainConfig.topn_target, choices=TOPN_TARGETS,
        help='what a rated pair should score: watched, 1; rating, max(rating - 2, 0.2); '
             'weighted, 1 with weight unobserved weight x (1 + max(rating - 2, 0.2)^confidence)')
    add('--topn-iterations', default=TrainConfig.topn_iterations,
        type=_bounded(int, '--topn-iterations', 1, 10_000),
        help='the most alternating iterations; validation NDCG@10 stops earlier')
    add('--topn-validation-users', default=TrainConfig.topn_validation_users,
        type=_bounded(int, '--topn-validation-users', 0, 1 << 31),
        help='rank a seeded sample of this many validation users after each top-N '
             'iteration when there are more, and at most 200M users x movies '
             '(0: as many as --ranking-users)')
    add('--topn-cg-steps', default=TrainConfig.topn_cg_steps,
        type=_bounded(int, '--topn-cg-steps', 1, 1024),
        help='conjugate-gradient steps per half-iteration')
    add('--topn-init-stddev', default=TrainConfig.topn_init_stddev,
        type=_bounded(float, '--topn-init-stddev', 0, 10, low_inclusive=False),
        help='standard deviation of the initial top-N factors')
    add('--topn-like-weight', default=TrainConfig.topn_like_weight,
        type=_bounded(float, '--topn-like-weight', 0, 10),
        help="beta: serve log(top-N score) + beta x log P(rating >= 4) by the rating model "
             '(default 0.25; 0: the top-N score alone, best with --topn-confidence 1)')


def _add_tuning_flags(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add('--metric-only', action='store_true',
        help='a tuning trial: train, write the loss log and report the validation '
             'metric only; implies --final-model best --posterior-samples 0 and '
             'skips the ranking evaluation and the export')
    add('--tuning-metric', default=TrainConfig.tuning_metric,
        choices=tuple(features.TUNING_METRICS),
        help="the metric a tuning trial reports: validation_rmse (the rating "
             "model's) or validation_ndcg (the top-N model's NDCG@10; "
             'hptuning-ranking.yaml)')


def parse_args(argv: Sequence[str] | None = None,
               environ: Mapping[str, str] | None = None) -> TrainConfig:
    """Parses flags (exits with a one-line error on bad ones) into a TrainConfig.

    Args:
      argv: the flags, without the program name; None means sys.argv[1:].
      environ: where the AIP_* and CLOUD_ML_* variables are read; None means
        os.environ.  Empty values count as unset.

    Returns:
      The validated config.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.work_dir.strip():
        parser.error("argument --work-dir: '' is empty; pass the directory "
                     'that preprocess.py wrote, e.g. --work-dir workdir')
    if args.training_kernel == 'fused' and args.optimizer != 'adam':
        parser.error(f'argument --training-kernel: fused trains with adam, not '
                     f'--optimizer {args.optimizer}; use --training-kernel auto')
    if args.training_kernel == 'fused' and args.implicit_feedback:
        parser.error('argument --training-kernel: fused has no implicit-feedback term; '
                     'use --training-kernel auto or tf with --implicit-feedback')
    if args.implicit_l2 is not None and not args.implicit_feedback:
        parser.error(f'argument --implicit-l2: {args.implicit_l2} applies only with '
                     '--implicit-feedback; add that flag or drop this one')
    hyperparameters = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(TrainConfig)
        if field.default is not dataclasses.MISSING and hasattr(args, field.name)}
    if args.tuning_metric == features.RANKING_METRIC_ID and args.topn_model not in ('auto',
                                                                                'ials'):
        parser.error(f'argument --tuning-metric: {args.tuning_metric} ranks the top-N model, '
                     f'which --topn-model {args.topn_model} turns off; use --topn-model ials')
    if args.tuning_metric == features.RANKING_METRIC_ID:
        # A ranking trial scores the iALS flags it was given: no search of its own.
        hyperparameters.update(topn_search='off')
    if args.metric_only:
        # The metric is the best epoch's validation RMSE, or the top-N model's best
        # iteration's validation NDCG: nothing after either changes it.
        hyperparameters.update(final_model='best', posterior_samples=0)
    return make_config(
        work_dir=args.work_dir, model_dir=args.job_dir,
        environ=os.environ if environ is None else environ, **hyperparameters)
