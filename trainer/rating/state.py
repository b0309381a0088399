"""What a training run checkpoints and how it resumes: model, optimiser, epoch, best epoch,
and the posterior chain.

A checkpoint holds the model, the optimiser's slots, the epoch reached and
the best epoch so far by validation RMSE with a copy of its parameters, so a
resumed run keeps early stopping and the best model exactly where the
interrupted one was.  A checkpoint dir also remembers which preprocessing
output it was trained on (`check_same_data`); resuming on other data, with
another --optimizer, or with tables of other shapes is refused with a message
that names the fix.

The posterior chain (`posterior.ChainState`: its rows, precisions, random
generator and running sums) is saved to CHECKPOINT_DIR/posterior/chain.npz
(temp file, then rename) every CHAIN_CHECKPOINT_SECONDS, after its last
sweep and when SIGTERM asks the run to stop, so a preempted chain resumes to
the same posterior mean, bit for bit; the stopping rule's batch means and
whether it stopped are part of that state, so a resumed chain stops at the
same sweep.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging

import numpy as np
import tensorflow as tf

from trainer import features
from trainer import fileio
from trainer import shutdown
from trainer.config import TrainConfig
from trainer.history import ResumeError
from trainer.rating import model as model_lib
from trainer.rating import optimizers
from trainer.rating import posterior as posterior_lib

logger = logging.getLogger(__name__)

_CHECKPOINTS_TO_KEEP = 3
_AGGREGATION = tf.VariableAggregation.ONLY_FIRST_REPLICA
_DATA_FILE = 'data.json'
# The DatasetInfo fields that identify the data a checkpoint was trained on.
_DATA_FIELDS = ('dataset', 'source_md5', 'seed', 'eval_percent', 'train_ratings',
                'eval_ratings', 'users', 'movies')


class BestEpoch(tf.Module):
    """The epoch with the lowest validation RMSE so far, and its parameters.

    Attributes:
      epoch: int64 scalar, 0 before the first epoch.
      validation_rmse: float64 scalar, +inf before the first epoch.
      parameters: copies of the model's tables, keyed like `model.parameters()`.
    """

    def __init__(self, model: model_lib.MatrixFactorization) -> None:
        super().__init__(name='best_epoch')
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name='epoch',
                                 aggregation=_AGGREGATION)
        self.validation_rmse = tf.Variable(
            float('inf'), dtype=tf.float64, trainable=False,
            name='validation_rmse', aggregation=_AGGREGATION)
        self.parameters = {
            name: tf.Variable(variable, trainable=False, name=f'best_{name}',
                              aggregation=_AGGREGATION)
            for name, variable in model.parameters().items()}

    def record(self, epoch: int, validation_rmse: float,
               model: model_lib.MatrixFactorization) -> None:
        """Makes `epoch` the best: copies the model's tables."""
        self.epoch.assign(epoch)
        self.validation_rmse.assign(validation_rmse)
        for name, variable in model.parameters().items():
            self.parameters[name].assign(variable)

    def restore_into(self, model: model_lib.MatrixFactorization) -> None:
        """Sets the model's tables to the best epoch's."""
        for name, variable in model.parameters().items():
            variable.assign(self.parameters[name])


@dataclasses.dataclass(frozen=True)
class State:
    """What a checkpoint holds, and its manager."""
    model: model_lib.MatrixFactorization
    optimizer: optimizers.SparseOptimizer
    epoch: tf.Variable
    best: BestEpoch
    manager: tf.train.CheckpointManager


def clear_outputs(config: TrainConfig) -> None:
    """With --overwrite, removes the model and checkpoint dirs (logged)."""
    if not config.overwrite:
        return
    for directory in dict.fromkeys((config.model_dir, config.checkpoint_dir)):
        if tf.io.gfile.exists(directory):
            logger.warning('--overwrite: removing %s', directory)
            tf.io.gfile.rmtree(directory)


def _check_shapes(path: str, model: model_lib.MatrixFactorization) -> None:
    """Refuses a checkpoint whose tables have other shapes, before restoring."""
    saved = dict(tf.train.list_variables(path))
    for name, variable in model.parameters().items():
        shape = saved.get(f'model/{name}/.ATTRIBUTES/VARIABLE_VALUE')
        if shape is not None and list(shape) != variable.shape.as_list():
            raise ResumeError(
                f'checkpoint {path} holds {name} of shape {list(shape)}, this '
                f'run builds {variable.shape.as_list()} (another --num-factors '
                'or vocabulary); re-run with the original flags or with '
                '--overwrite to start fresh')


def restore(checkpoint: tf.train.Checkpoint, directory: str) -> None:
    """Restores the latest checkpoint in directory, if any, insisting on an exact match.

    Raises:
      ResumeError: if the checkpoint was written with another --optimizer,
        --num-factors or vocabulary (or by another version of the trainer),
        which resuming cannot reconcile.
    """
    path = tf.train.latest_checkpoint(directory)
    if path is None:
        return
    _check_shapes(path, checkpoint.model)
    status = checkpoint.restore(path)
    try:
        status.assert_consumed()
    except AssertionError as error:
        status.expect_partial()  # we report the mismatch ourselves
        raise ResumeError(
            f'checkpoint {path} does not match this run (another --optimizer, '
            'or written by another version of the trainer); re-run with the '
            'original flags or with --overwrite to start fresh') from error
    logger.info('Resuming from %s', path)


def check_same_data(config: TrainConfig, info: features.DatasetInfo) -> None:
    """Refuses to resume a checkpoint trained on other data; records this data.

    A checkpoint dir remembers which preprocessing output it was trained on
    (checkpoints/data.json).  When preprocess.py re-ran with --overwrite
    (another split seed, another archive), resuming would continue a model
    fitted to the old split and report it against the new one: refused.

    Raises:
      ResumeError: the checkpoints were trained on other data.
    """
    current = {name: getattr(info, name) for name in _DATA_FIELDS}
    resume_dir = config.resume_checkpoint_dir or config.checkpoint_dir
    recorded_path = features.join(resume_dir, _DATA_FILE)
    if (not config.overwrite and tf.train.latest_checkpoint(resume_dir)
            and tf.io.gfile.exists(recorded_path)):
        recorded = features.read_json(recorded_path)
        changed = sorted(name for name in _DATA_FIELDS if recorded.get(name) != current[name])
        if changed:
            raise ResumeError(
                f'the checkpoints in {resume_dir} were trained on other data '
                f'({", ".join(changed)} changed: preprocess.py re-ran?); pass '
                '--overwrite to train afresh, or another --job-dir')
    tf.io.gfile.makedirs(config.checkpoint_dir)
    features.write_json(features.join(config.checkpoint_dir, _DATA_FILE), current)


def build_state(config: TrainConfig, info: features.DatasetInfo,
                user_vocab_size: int, item_vocab_size: int,
                strategy: tf.distribute.Strategy) -> State:
    """Creates model, optimiser, epoch counter and best epoch in the strategy scope; restores."""
    with strategy.scope():
        model = model_lib.MatrixFactorization(
            user_vocab_size, item_vocab_size, config.num_factors,
            global_mean=info.train_mean_rating,
            init_stddev=config.init_stddev, seed=config.seed,
            implicit_feedback=config.implicit_feedback)
        optimizer = optimizers.make_optimizer(
            config.optimizer, model.parameters(), config.learning_rate)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name='epoch',
                            aggregation=_AGGREGATION)
        best = BestEpoch(model)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                     epoch=epoch, best=best)
    manager = tf.train.CheckpointManager(
        checkpoint, config.checkpoint_dir, max_to_keep=_CHECKPOINTS_TO_KEEP)
    # With --overwrite nobody resumes: a worker must not read the chief's
    # checkpoints while the chief is removing them.
    if not config.overwrite:
        restore(checkpoint, config.resume_checkpoint_dir or config.checkpoint_dir)
    return State(model, optimizer, epoch, best, manager)


_CHAIN_FILE = 'chain.npz'
# The chain's running sums reach hundreds of MB at 25M ratings (487 MB at
# their widest, about 4 s to write on a shared 2-core machine): saved at most once
# a minute, and at most a tenth of the chain's time, besides its last sweep
# and SIGTERM.
CHAIN_CHECKPOINT_SECONDS = 60.0
CHAIN_CHECKPOINT_SHARE = 0.1
# `posterior.BatchMeans.state`: its counts (in the header) and its arrays.
_BATCH_COUNTS = ('size', 'kept', 'in_current')
_BATCH_ARRAYS = ('whole', 'current', 'total', 'squares')


def chain_path(checkpoint_dir: str) -> str:
    return features.join(checkpoint_dir, features.POSTERIOR_CHECKPOINT_DIR, _CHAIN_FILE)


def save_chain(path: str, chain: posterior_lib.ChainState) -> None:
    """Writes the chain's state to path (temp file, then rename)."""
    arrays = {name: getattr(chain, name) for name in (
        'users_now', 'items_now', 'user_prior', 'item_prior', 'alpha', 'beta',
        'user_bias_sum', 'item_bias_sum')}
    arrays.update({f'product_left_{i}': part for i, part in enumerate(chain.product_left)})
    arrays.update({f'product_right_{i}': part for i, part in enumerate(chain.product_right)})
    header = {'sweep': chain.sweep, 'settings': list(chain.settings),
              'noise': list(chain.noise), 'rng': chain.rng,
              'parts': len(chain.product_left), 'stopped': chain.stopped,
              'batches': None}
    if chain.batches is not None:  # the stopping rule's batch means
        header['batches'] = {name: int(chain.batches[name])
                             for name in _BATCH_COUNTS}
        arrays.update({f'batches_{name}': chain.batches[name] for name in _BATCH_ARRAYS})
    fileio.makedirs(path.rsplit('/', 1)[0])
    with shutdown.writing():
        with fileio.open_file(path + '.tmp', 'wb') as f:
            if fileio.is_local(path):  # straight to disk: the sums can be hundreds of MB
                np.savez(f, header=json.dumps(header), **arrays)
            else:  # the zip format seeks back; GCS uploads write forward only
                buffer = io.BytesIO()
                np.savez(buffer, header=json.dumps(header), **arrays)
                f.write(buffer.getvalue())
        fileio.replace(path + '.tmp', path)


def load_chain(path: str) -> posterior_lib.ChainState | None:
    """The chain state saved at path, or None if there is none."""
    if not fileio.exists(path):
        return None
    with fileio.open_file(path, 'rb') as f:
        saved = np.load(io.BytesIO(f.read()))
        header = json.loads(str(saved['header']))
        parts = range(header['parts'])
        batches = header.get('batches')
        if batches is not None:
            batches = dict(batches, **{name: saved[f'batches_{name}']
                                       for name in _BATCH_ARRAYS})
        return posterior_lib.ChainState(
            sweep=header['sweep'], settings=tuple(header['settings']),
            users_now=saved['users_now'], items_now=saved['items_now'],
            user_prior=saved['user_prior'], item_prior=saved['item_prior'],
            noise=tuple(header['noise']), alpha=saved['alpha'], beta=saved['beta'],
            rng=header['rng'],
            product_left=tuple(saved[f'product_left_{i}'] for i in parts),
            product_right=tuple(saved[f'product_right_{i}'] for i in parts),
            user_bias_sum=saved['user_bias_sum'], item_bias_sum=saved['item_bias_sum'],
            batches=batches, stopped=bool(header.get('stopped', False)))
