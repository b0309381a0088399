"""The distribution strategy, built from the cluster the environment describes.

Vertex AI tells every replica of a custom job where it stands in `CLUSTER_SPEC`
(worker pools `workerpool0`..`workerpool3`) and, for TensorFlow, in
`TF_CONFIG` (task types `chief`, `worker`, `ps`, `evaluator`).  This module
reads them once, at start-up (`make_strategy`), and builds one strategy:

- no cluster, or a cluster of one task: the default strategy (one process);
- a chief and/or workers: `tf.distribute.MultiWorkerMirroredStrategy`.  Each
  worker holds a full copy of the tables, reads every other slice of each
  global batch, and the sparse gradients are all-reduced (`trainer.rating.train`).

`TF_CONFIG` is read by `TFConfigClusterResolver` only; a `CLUSTER_SPEC` without
a `TF_CONFIG` is first translated into one (`adopt_cluster_spec`).  Parameter
servers and evaluators are refused: the tables are small enough to mirror, and
every worker computes the global eval metrics itself.

The chief writes the real outputs; every other worker runs the same collective
steps (checkpoints and the export included) against a local scratch directory
(`scratch_dir`) that is removed when it ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING

from trainer import logs

if TYPE_CHECKING:  # TensorFlow loads when a strategy is made, not when flags are read
    import tensorflow as tf

logger = logging.getLogger(__name__)

ENV_TF_CONFIG = 'TF_CONFIG'
ENV_CLUSTER_SPEC = 'CLUSTER_SPEC'

CHIEF = 'chief'
WORKER = 'worker'
# Vertex AI's worker pools (workerPoolSpecs[0..3]) as TensorFlow task types,
# the mapping Vertex itself uses when it writes TF_CONFIG.
POOL_TASK_TYPES = {'workerpool0': CHIEF, 'workerpool1': WORKER,
                   'workerpool2': 'ps', 'workerpool3': 'evaluator'}


class ClusterError(ValueError):
    """The environment describes a cluster this trainer cannot run in."""


@dataclasses.dataclass(frozen=True)
class Task:
    """This process's place in the cluster.

    Attributes:
      task_type: 'chief' or 'worker' (a lone process is the chief).
      task_id: the index within its task type.
      num_workers: processes training together, the chief included.
      is_chief: whether this process writes the real outputs.
    """
    task_type: str
    task_id: int
    num_workers: int
    is_chief: bool

    @property
    def name(self) -> str:
        return f'{self.task_type}-{self.task_id}'


def tf_config_from_cluster_spec(cluster_spec: Mapping) -> dict:
    """Translates Vertex AI's CLUSTER_SPEC into the TF_CONFIG form.

    Args:
      cluster_spec: the parsed CLUSTER_SPEC, e.g. {'cluster': {'workerpool0':
        ['host-a:2222'], 'workerpool1': ['host-b:2222']}, 'task': {'type':
        'workerpool1', 'index': 0}, ...}.

    Returns:
      {'cluster': {task type: addresses}, 'task': {'type': ..., 'index': ...}}
      with pools renamed by POOL_TASK_TYPES and empty pools left out.

    Raises:
      ClusterError: if the cluster or task is missing or names another pool.
    """
    cluster, task = cluster_spec.get('cluster'), cluster_spec.get('task')
    if not isinstance(cluster, Mapping) or not isinstance(task, Mapping):
        raise ClusterError(f'{ENV_CLUSTER_SPEC} needs a "cluster" and a "task" '
                           f'object, got keys {sorted(cluster_spec)!r}')
    unknown = sorted(set(cluster) - set(POOL_TASK_TYPES)) or (
        [task.get('type')] if task.get('type') not in POOL_TASK_TYPES else [])
    if unknown:
        raise ClusterError(f'{ENV_CLUSTER_SPEC} names worker pool {unknown[0]!r}; '
                           f'expected one of {sorted(POOL_TASK_TYPES)}')
    return {
        'cluster': {POOL_TASK_TYPES[pool]: list(addresses)
                    for pool, addresses in cluster.items() if addresses},
        'task': {'type': POOL_TASK_TYPES[task['type']],
                 'index': int(task.get('index', 0))},
    }


def adopt_cluster_spec(environ: MutableMapping[str, str]) -> None:
    """Sets TF_CONFIG from CLUSTER_SPEC when only the latter is set.

    TF_CONFIG, when set, wins untouched: Vertex AI sets both for TensorFlow
    jobs, and other launchers set only TF_CONFIG.  An empty TF_CONFIG counts
    as unset (and is removed: TFConfigClusterResolver cannot parse it).

    Raises:
      ClusterError: if CLUSTER_SPEC is not valid JSON of the expected shape.
    """
    if environ.get(ENV_TF_CONFIG) == '':
        del environ[ENV_TF_CONFIG]
    if environ.get(ENV_TF_CONFIG) or not environ.get(ENV_CLUSTER_SPEC):
        return
    try:
        cluster_spec = json.loads(environ[ENV_CLUSTER_SPEC])
    except json.JSONDecodeError as error:
        raise ClusterError(f'{ENV_CLUSTER_SPEC} is not JSON: {error}') from error
    if not isinstance(cluster_spec, Mapping):
        raise ClusterError(f'{ENV_CLUSTER_SPEC} is not a JSON object')
    environ[ENV_TF_CONFIG] = json.dumps(tf_config_from_cluster_spec(cluster_spec))
    logger.info('Translated %s into %s: %s', ENV_CLUSTER_SPEC, ENV_TF_CONFIG,
                environ[ENV_TF_CONFIG])


def find_task(cluster_spec: tf.train.ClusterSpec, task_type: str | None,
              task_id: int | None) -> Task:
    """Where this process stands, and whether the cluster is one we can train in.

    The chief is the 'chief' task or, in a cluster without one, worker 0 (the
    rule TensorFlow itself applies).

    Raises:
      ClusterError: for parameter servers or evaluators, more than one chief,
        or a task that is not in the cluster.
    """
    jobs = {job: cluster_spec.num_tasks(job) for job in cluster_spec.jobs}
    if sum(jobs.values()) <= 1:
        return Task(task_type or CHIEF, task_id or 0, 1, is_chief=True)
    if not task_type:
        raise ClusterError(f'{ENV_TF_CONFIG} describes a cluster of {jobs!r} '
                           'but no "task" for this process')
    others = sorted((set(jobs) | {task_type}) - {CHIEF, WORKER})
    if others:
        raise ClusterError(
            f'the cluster has task type {others[0]!r}; this trainer runs '
            'MultiWorkerMirroredStrategy, which takes a chief (worker pool 0) '
            'and workers (pool 1) only: drop the parameter-server and '
            'evaluator pools')
    if jobs.get(CHIEF, 0) > 1:
        raise ClusterError(f'the cluster has {jobs[CHIEF]} chiefs; give it one')
    task_id = task_id or 0
    if not 0 <= task_id < jobs.get(task_type, 0):
        raise ClusterError(f'task {task_type}:{task_id} is not in the cluster '
                           f'{jobs!r}')
    is_chief = task_type == CHIEF or (
        CHIEF not in jobs and task_type == WORKER and task_id == 0)
    return Task(task_type, task_id, sum(jobs.values()), is_chief)


def make_strategy(environ: MutableMapping[str, str]
                  ) -> tuple[tf.distribute.Strategy, Task]:
    """Builds the strategy the environment calls for; call it before other TF work.

    The one place that reads the cluster from the environment.
    MultiWorkerMirroredStrategy starts this task's server and waits until
    every task has started (no time limit: Vertex AI starts them together).
    A task that dies later stops sending heartbeats to TensorFlow's
    coordination service, which then fails the collectives of the others
    (15 s after a SIGKILL in our tests).  Under this strategy TensorFlow's
    preemption notifier catches SIGTERM, so a replica keeps running until
    it ends or gets SIGKILL.

    Args:
      environ: the process environment (os.environ: TFConfigClusterResolver
        reads TF_CONFIG from there).

    Returns:
      The strategy and this process's task.

    Raises:
      ClusterError: if the cluster is malformed or not supported.
    """
    tf = logs.import_tensorflow()
    adopt_cluster_spec(environ)
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    try:
        cluster_spec = resolver.cluster_spec()
    except json.JSONDecodeError as error:
        raise ClusterError(f'{ENV_TF_CONFIG} is not JSON: {error}') from error
    task = find_task(cluster_spec, resolver.task_type, resolver.task_id)
    if task.num_workers == 1:
        return tf.distribute.get_strategy(), task
    logger.info('MultiWorkerMirroredStrategy: %s of %d workers%s', task.name,
                task.num_workers, ' (chief)' if task.is_chief else '')
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver), task


def wait_for_all(strategy: tf.distribute.Strategy) -> None:
    """Returns once every worker got here (a one-number all-reduce).

    A worker that ended while the chief was still writing would look dead
    to the coordination service; ending together avoids that.
    """
    tf = logs.import_tensorflow()

    @tf.function  # eager collectives work too, but warn of their overhead
    def all_reduce_one() -> tf.Tensor:
        return strategy.reduce(tf.distribute.ReduceOp.SUM,
                               strategy.run(lambda: tf.ones([])), axis=None)

    all_reduce_one()


@contextlib.contextmanager
def scratch_dir(task: Task) -> Iterator[str | None]:
    """None on the chief; elsewhere a local temporary directory, removed at the end."""
    if task.is_chief:
        yield None
        return
    path = tempfile.mkdtemp(prefix=f'trainer-{task.name}-')
    logger.info('%s is not the chief: its outputs go to %s, removed at the end',
                task.name, path)
    try:
        yield path
    finally:
        shutil.rmtree(path)
