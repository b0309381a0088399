"""Benchmark: the lists `recommend` serves against the best open-source top-N recommenders.

Owns the ranking benchmark.  It reads a work dir the pipeline and the trainer
already wrote (`./run-local.sh --work-dir W`, or any run of
`python -m trainer.task`), loads the exact train/eval split and the
trainer's validation slice (`trainer.data`: the same seeded carve of train),
and scores every ranker with the trainer's protocol (`trainer.topn.ranking`):
candidates are the movies a user did not rate in train, relevant are the
user's eval movies rated >= 4, k = 10, over every eval user (or the seeded
sample the trainer used past `--ranking-users`).

Rows:

- **served**: the exported SavedModel's `recommend` signature, called with
  every ranked user's raw id, exactly as `recommend.py` does;
- most popular (train rating counts);
- item kNN: cosine similarity of the movies' train rating columns, a user's
  score the sum of their ratings times similarity;
- EASE (Steck 2019), closed form, on the 0/1 matrix and on the graded one
  (max(r - 2, 0.2)), where the movies x movies inverse fits in memory
  (`--ease-max-movies`);
- `implicit`'s ALS (CG solver) on the 0/1 matrix and on one weighted by the
  rating (1 + max(r - 2, 0.2)), and its BPR on the 0/1 matrix and on the
  pairs rated >= 4.

Every rival's hyperparameters are chosen on the trainer's validation slice
(fit on train minus the slice, NDCG@10 on the slice), then it is refitted on
all of train and scored once on eval.  Eval never picks anything.  "fit s" is
the refit's wall time on this machine (`implicit` uses every core).

Usage (benchmark-only packages: `pip install -r bench/requirements.txt`)::

    ./run-local.sh --dataset synthetic --work-dir workdir-synthetic
    .venv/bin/python bench/ranking.py --work-dir workdir-synthetic
    .venv/bin/python bench/ranking.py --work-dir workdir --quick --json-out ranking.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer import logs  # noqa: E402

logs.quiet_startup(sys.argv[1:])  # TensorFlow's start-up lines, before it loads

import tensorflow as tf  # noqa: E402
import tensorflow_transform as tft  # noqa: E402

from trainer import data, features  # noqa: E402
from trainer.pipeline import synthetic  # noqa: E402
from trainer.topn import ease as ease_lib  # noqa: E402
from trainer.topn import ranking, train as topn_train  # noqa: E402

logger = logging.getLogger('bench.ranking')

EASE_LAMBDAS = (100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0, 6400.0, 12800.0, 25600.0, 51200.0)
ALS_GRID = {'factors': (16, 64, 128), 'regularization': (1.0, 5.0, 20.0, 50.0, 100.0, 200.0)}
BPR_GRID = {'factors': (64, 128), 'learning_rate': (0.01, 0.05)}
KNN_NEIGHBOURS = (50, 200, 0)  # 0: every movie
QUICK = {'ease': (400.0, 1600.0), 'als': {'factors': (16, 64), 'regularization': (5.0, 20.0)},
         'bpr': {'factors': (64,), 'learning_rate': (0.01,)}, 'knn': (200,)}
ALS_ITERATIONS, BPR_ITERATIONS = 15, 100
# The planted ceiling scores every ranked user x movie, about 2 s per million
# cells; past this it is left out.
CEILING_MAX_CELLS = 300_000_000
Scorer = Callable[[tf.Tensor], tf.Tensor] | np.ndarray


def graded(ratings: np.ndarray) -> np.ndarray:
    """max(r - 2, 0.2): what a rating is worth in a rating-aware matrix (EASE's x)."""
    return ease_lib.pair_values(ratings).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One fit/score pair: the matrix to fit on and the ratings to rank against."""
    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    target: data.Ratings
    num_users: int
    num_items: int

    def matrix(self, values: np.ndarray | None = None) -> sparse.csr_matrix:
        values = np.ones(self.ratings.size) if values is None else values
        return sparse.csr_matrix((values.astype(np.float32), (self.users, self.items)),
                                 shape=(self.num_users, self.num_items))

    def ndcg_etc(self, scorer: Scorer, max_users: int, seed: int) -> dict[str, float]:
        seen = topn_train.pairs_catalog(
            data.Ratings(tf.constant(self.users), tf.constant(self.items),
                         tf.constant(self.ratings)), self.num_users, self.num_items)
        record = ranking.evaluate_lists(
            {'ranker': scorer}, seen, self.target.user.numpy(), self.target.item.numpy(),
            self.target.rating.numpy(), max_users=max_users, seed=seed)
        return record['ranker']


def _item_item_scorer(x: sparse.csr_matrix, weights: np.ndarray) -> Callable:
    """Scores X[users] @ weights in TensorFlow ops (`rank_users` traces its scorer):
    each block's rows of X are scattered into a dense block, then one matmul."""
    rows = tf.RaggedTensor.from_row_splits(
        tf.constant(x.indices.astype(np.int64)), tf.constant(x.indptr.astype(np.int64)))
    values = tf.RaggedTensor.from_row_splits(
        tf.constant(x.data.astype(np.float32)), tf.constant(x.indptr.astype(np.int64)))
    weights = tf.constant(weights.astype(np.float32))

    def score(user: tf.Tensor) -> tf.Tensor:
        items, block_values = tf.gather(rows, user), tf.gather(values, user)
        where = tf.stack([items.value_rowids(), items.flat_values], axis=1)
        dense = tf.scatter_nd(where, block_values.flat_values,
                              tf.cast([tf.size(user), x.shape[1]], tf.int64))
        return tf.matmul(dense, weights)
    return score


def ease(problem: Problem, values: np.ndarray | None, lam: float) -> Callable:
    x = problem.matrix(values)
    return _item_item_scorer(x, ease_lib.weights_from_gram(
        (x.T @ x).toarray().astype(np.float64), lam))


def item_knn(problem: Problem, neighbours: int) -> Callable:
    x = problem.matrix(problem.ratings)
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=0))).ravel()
    norms[norms == 0] = 1.0
    similarity = (x.T @ x).toarray() / norms[:, None] / norms[None, :]
    np.fill_diagonal(similarity, 0.0)
    if 0 < neighbours < problem.num_items:
        cut = np.argpartition(-similarity, neighbours, axis=1)[:, neighbours:]
        np.put_along_axis(similarity, cut, 0.0, axis=1)
    return _item_item_scorer(x, similarity.T)


def implicit_model(problem: Problem, kind: str, values: np.ndarray, seed: int,
                   **settings: Any) -> Callable:
    from implicit.cpu.als import AlternatingLeastSquares  # pylint: disable=import-outside-toplevel
    from implicit.cpu.bpr import BayesianPersonalizedRanking  # pylint: disable=import-outside-toplevel
    import threadpoolctl  # pylint: disable=import-outside-toplevel  # implicit's dependency
    keep = values > 0
    matrix = sparse.csr_matrix((values[keep].astype(np.float32),
                                (problem.users[keep], problem.items[keep])),
                               shape=(problem.num_users, problem.num_items))
    # implicit runs its own threads; BLAS threads inside them oversubscribe the
    # cores, which implicit warns about and asks to turn off.
    with threadpoolctl.threadpool_limits(1, 'blas'):
        if kind == 'als':
            model = AlternatingLeastSquares(iterations=ALS_ITERATIONS, random_state=seed,
                                            **settings)
        else:
            model = BayesianPersonalizedRanking(iterations=BPR_ITERATIONS, random_state=seed,
                                                **settings)
        model.fit(matrix, show_progress=False)
    return ranking.factor_scorer(np.asarray(model.user_factors, np.float32),
                                 np.asarray(model.item_factors, np.float32),
                                 problem.num_items)


@dataclasses.dataclass(frozen=True)
class Rival:
    name: str
    grid: tuple[dict[str, Any], ...]
    build: Callable[[Problem, dict[str, Any]], Scorer]


def rivals(num_items: int, ease_max_movies: int, quick: bool, seed: int,
           with_implicit: bool = True) -> list[Rival]:
    def grid(spec: dict[str, tuple]) -> tuple[dict[str, Any], ...]:
        return tuple(dict(zip(spec, values)) for values in itertools.product(*spec.values()))
    lambdas = QUICK['ease'] if quick else EASE_LAMBDAS
    als = grid(QUICK['als'] if quick else ALS_GRID)
    bpr = grid(QUICK['bpr'] if quick else BPR_GRID)
    knn = QUICK['knn'] if quick else KNN_NEIGHBOURS
    out = [Rival('most popular', ({},), lambda p, s: np.bincount(
        p.items, minlength=p.num_items).astype(np.float64))]
    if num_items <= ease_max_movies:
        out += [
            Rival('item kNN (cosine)', tuple({'neighbours': n} for n in knn),
                  lambda p, s: item_knn(p, s['neighbours'])),
            Rival('EASE, 0/1', tuple({'lam': lam} for lam in lambdas),
                  lambda p, s: ease(p, None, s['lam'])),
            Rival('EASE, graded', tuple({'lam': lam} for lam in lambdas),
                  lambda p, s: ease(p, graded(p.ratings), s['lam']))]
    if not with_implicit:
        return out
    out += [
        Rival('implicit ALS, 0/1', als, lambda p, s: implicit_model(
            p, 'als', np.ones(p.ratings.size), seed, **s)),
        Rival('implicit ALS, weighted', als, lambda p, s: implicit_model(
            p, 'als', 1.0 + graded(p.ratings), seed, **s)),
        Rival('implicit BPR, 0/1', bpr, lambda p, s: implicit_model(
            p, 'bpr', np.ones(p.ratings.size), seed, **s)),
        Rival('implicit BPR, rated >= 4', bpr, lambda p, s: implicit_model(
            p, 'bpr', (p.ratings >= ranking.RELEVANT_RATING).astype(np.float64), seed, **s))]
    return out


def tune_and_score(rival: Rival, tuning: Problem, final: Problem, max_users: int,
                   seed: int) -> dict[str, Any]:
    """Chooses rival's settings by validation NDCG@10, refits on train, scores eval."""
    best, best_ndcg = rival.grid[0], -1.0
    if len(rival.grid) > 1:
        for settings in rival.grid:
            ndcg = tuning.ndcg_etc(rival.build(tuning, settings), max_users, seed)['ndcg']
            logger.info('%s %s: validation NDCG@10 %.4f', rival.name, settings, ndcg)
            if ndcg > best_ndcg:
                best, best_ndcg = settings, ndcg
    started = time.perf_counter()
    scorer = rival.build(final, best)
    seconds = time.perf_counter() - started
    return {'name': rival.name, 'settings': best, 'fit_seconds': seconds,
            'validation_ndcg': best_ndcg if len(rival.grid) > 1 else None,
            **final.ndcg_etc(scorer, max_users, seed)}


def served_lists(work_dir: str, model_dir: str, users: np.ndarray, k: int) -> np.ndarray:
    """The exported `recommend` lists of vocabulary users, as item indices (-1 pads)."""
    output = tft.TFTransformOutput(features.transformed_dir(work_dir))
    user_ids = np.array(output.vocabulary_by_name(features.USER_VOCAB), dtype=object)
    movie_ids = [m.decode('utf-8') if isinstance(m, bytes) else str(m)
                 for m in output.vocabulary_by_name(features.MOVIE_VOCAB)]
    index_of = {movie: index for index, movie in enumerate(movie_ids)}
    signature = tf.saved_model.load(features.join(model_dir, features.EXPORT_DIR)).signatures[
        features.RECOMMEND_SIGNATURE]
    lists = []
    for start in range(0, users.size, 256):
        batch = [u.decode('utf-8') if isinstance(u, bytes) else str(u)
                 for u in user_ids[users[start:start + 256]]]
        out = signature(user_id=tf.constant(batch), k=tf.constant(k, tf.int32))
        lists.append(np.vectorize(lambda m: index_of.get(m.decode('utf-8'), -1), otypes=[np.int32])(
            out[features.MOVIE_IDS].numpy()))
    return np.concatenate(lists)


def served_row(work_dir: str, model_dir: str, problem: Problem, max_users: int,
               seed: int) -> dict[str, Any]:
    """The served lists scored like every rival (same users, same relevant pairs)."""
    judged = ranking.judge(problem.num_users, problem.num_items,
                           problem.target.user.numpy(), problem.target.item.numpy(),
                           problem.target.rating.numpy(), max_users=max_users, seed=seed)
    started = time.perf_counter()
    top = served_lists(work_dir, model_dir, judged.users, ranking.TOP_K)
    seconds = time.perf_counter() - started
    metrics = ranking.ranking_metrics(top, judged.rows, judged.items, problem.num_items,
                                      ranking.TOP_K)
    train_metrics = features.read_json(features.join(model_dir, features.METRICS_FILE))
    topn_record = train_metrics.get('topn') or {}
    return {'name': 'this trainer: the lists recommend serves', 'settings': topn_record,
            'fit_seconds': topn_record.get('seconds'), 'serve_seconds': seconds,
            'validation_ndcg': topn_record.get('validation_ndcg'), **metrics}


def planted_row(work_dir: str, problem: Problem, max_users: int, seed: int,
                eval_percent: float) -> dict[str, Any] | None:
    """The planted Bayes ranking on the same users, for generated (movielens) data.

    Redraws the planted model from the staged truth.json's config and ranks
    by `synthetic.holdout_relevance` with the split's eval share: what no
    model trained on these ratings should beat beyond sampling noise.  None
    for real archives and rank3 data.
    """
    path = features.join(features.raw_dir(work_dir), features.TRUTH_FILE)
    if not tf.io.gfile.exists(path):
        return None
    truth = features.read_json(path)
    config = synthetic.config_from_truth(truth)
    if config.model != synthetic.MOVIELENS:
        logger.info('%s data: no planted ranking to compare with', config.model)
        return None
    state = synthetic.planted_state(config)
    output = tft.TFTransformOutput(features.transformed_dir(work_dir))
    user_rows = np.array([int(u) - 1 for u in output.vocabulary_by_name(features.USER_VOCAB)])
    movie_rows = np.array([int(m) - 1 for m in output.vocabulary_by_name(features.MOVIE_VOCAB)])
    thresholds = np.array(truth['thresholds'])

    def scores(users: np.ndarray) -> np.ndarray:
        relevance = synthetic.holdout_relevance(
            config, state['planted'], state['popularity'], state['counts'],
            state['user_noise'], thresholds, user_rows[users], eval_percent / 100.0)
        return relevance[:, movie_rows].astype(np.float32)

    def scorer(user: tf.Tensor) -> tf.Tensor:
        block = tf.numpy_function(scores, [user], tf.float32, stateful=False)
        return tf.ensure_shape(block, [None, problem.num_items])
    started = time.perf_counter()
    record = problem.ndcg_etc(scorer, max_users, seed)
    return {'name': 'planted Bayes ranking (the ceiling)', 'settings': {},
            'fit_seconds': None, 'score_seconds': time.perf_counter() - started, **record}


def load_problems(work_dir: str) -> tuple[Problem, Problem, dict[str, Any]]:
    """(validation problem, eval problem, facts) from the work dir's split."""
    info = features.read_dataset_info(work_dir)
    train, evaluation = data.load_checked((info.train_pattern, info.eval_pattern))
    fit, validation = data.split_validation(train, 10.0, info.seed)
    num_users, num_items = data.read_vocabulary_sizes(features.transformed_dir(work_dir))

    def problem(ratings: data.Ratings, target: data.Ratings) -> Problem:
        return Problem(ratings.user.numpy().astype(np.int64),
                       ratings.item.numpy().astype(np.int64),
                       ratings.rating.numpy().astype(np.float64), target,
                       num_users, num_items)
    return (problem(fit, validation), problem(train, evaluation),
            {'dataset': info.dataset, 'train_ratings': len(train),
             'eval_ratings': len(evaluation), 'users': num_users, 'movies': num_items,
             'seed': info.seed, 'eval_percent': info.eval_percent})


def format_table(report: dict[str, Any]) -> str:
    lines = [f'{"ranker":<42} {"NDCG@10":>8} {"P@10":>7} {"R@10":>7} {"cov":>6} '
             f'{"fit s":>7}  chosen on validation']
    for row in report['rows'] + ([report['ceiling']] if report.get('ceiling') else []):
        seconds = '' if row['fit_seconds'] is None else f'{row["fit_seconds"]:.1f}'
        settings = ', '.join(f'{k} {v}' for k, v in row['settings'].items()
                             if k in ('lam', 'neighbours', 'factors', 'regularization',
                                      'learning_rate', 'iterations'))
        lines.append(f'{row["name"]:<42} {row["ndcg"]:>8.4f} {row["precision"]:>7.4f} '
                     f'{row["recall"]:>7.4f} {row["coverage"]:>6.3f} {seconds:>7}  {settings}')
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='bench/ranking.py', allow_abbrev=False,
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--work-dir', required=True,
                        help='a work dir preprocess.py and the trainer wrote')
    parser.add_argument('--job-dir', default=None, help='model dir (default WORK_DIR/model)')
    parser.add_argument('--quick', action='store_true', help='small grids (a smoke run)')
    parser.add_argument('--ease-max-movies', type=int, default=20_000,
                        help='skip EASE and item kNN above this many movies (memory)')
    parser.add_argument('--no-implicit', action='store_true',
                        help="leave out implicit's ALS and BPR (when it is not installed)")
    parser.add_argument('--rival', action='append', default=[],
                        help='only the rivals whose name contains this text (repeatable), '
                             "e.g. --rival 'most popular' --rival 'ALS, weighted'")
    parser.add_argument('--json-out', default=None,
                        help='where the JSON goes (default bench/results/ranking-<UTC>.json)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    # Every rival's scorer is a new function to trace, which TensorFlow would
    # report as excessive retracing after a few rivals: expected here.
    tf.get_logger().setLevel(logging.ERROR)
    model_dir = args.job_dir or features.default_model_dir(args.work_dir)
    if not tf.io.gfile.exists(features.join(model_dir, features.METRICS_FILE)):
        parser.error(f'--work-dir {args.work_dir}: no {features.METRICS_FILE} in {model_dir}; '
                     f'run ./run-local.sh --work-dir {args.work_dir} first')
    metrics = features.read_json(features.join(model_dir, features.METRICS_FILE))
    max_users = int(metrics.get('config', {}).get('ranking_users', 0))
    tuning, final, facts = load_problems(args.work_dir)
    rows = [served_row(args.work_dir, model_dir, final, max_users, facts['seed'])]
    ranked_users = min(max_users or facts['users'], facts['users'])
    ceiling = None
    if ranked_users * facts['movies'] <= CEILING_MAX_CELLS:
        ceiling = planted_row(args.work_dir, final, max_users, facts['seed'],
                              facts['eval_percent'])
    else:
        logger.info('%d users x %d movies: too many to score the planted ceiling here; '
                    "truth.json's ranking.ndcg_at_10 holds it for 1,000 users",
                    ranked_users, facts['movies'])
    chosen = [rival for rival in rivals(facts['movies'], args.ease_max_movies, args.quick,
                                        facts['seed'], with_implicit=not args.no_implicit)
              if not args.rival or any(text in rival.name for text in args.rival)]
    if not chosen:
        parser.error(f'--rival {args.rival}: no rival has such a name; see the table of '
                     'bench/ranking.py without --rival')
    for rival in chosen:
        rows.append(tune_and_score(rival, tuning, final, max_users, facts['seed']))
        logger.info('%s: eval NDCG@10 %.4f', rival.name, rows[-1]['ndcg'])
    report = {'measured': datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec='seconds'), **facts, 'ranked_users_cap': max_users, 'rows': rows,
        'ceiling': ceiling}
    best_rival = max(rows[1:], key=lambda row: row['ndcg'])
    print(format_table(report))
    print(f'served NDCG@10 / best rival ({best_rival["name"]}): '
          f'{rows[0]["ndcg"] / best_rival["ndcg"]:.3f}x')
    if ceiling is not None:
        print(f'served NDCG@10 / planted ceiling: {rows[0]["ndcg"] / ceiling["ndcg"]:.3f}; '
              f'best rival / ceiling: {best_rival["ndcg"] / ceiling["ndcg"]:.3f}')
    out = args.json_out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), 'results',
        f'ranking-{report["measured"].replace(":", "")}.json')
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w', encoding='utf-8') as f:
        json.dump(report, f, indent=2, default=str)
    print(f'JSON: {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
