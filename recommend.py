"""Top-k movies for users from the exported model, as a table or as JSON.

Owns the command line around the SavedModel's `recommend` signature
(trainer/serving/export.py): it finds the export, feeds raw user ids in batches and
formats what comes back.  It scores nothing itself.

    .venv/bin/python recommend.py --model-dir WORK_DIR/model --user 196 [-k 10] [--json]
    .venv/bin/python recommend.py --model-dir gs://bucket/run/model --users-file users.txt --json

--model-dir is the trainer's model dir (the SavedModel is its export/), the
export dir itself, or the work dir (its model/export/), local or gs://.  --users-file holds one user id per line
(blank lines are skipped).  An id the model never saw in training gets the
newcomer list (best movies by learned bias shrunk by rating count), marked
as such.  Each line shows the list's score (what ranks it: the log of the
top-N model's score plus the rating model's like term, see
`trainer.topn.ranking.topn_scores`) and the rating model's predicted rating of
that movie.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence

from trainer import features, logs

logger = logging.getLogger(__name__)

MAX_K = 10_000
DEFAULT_K = 10
# Users per signature call: a call scores users x movies floats (162k movies
# would make 256 users 160 MB).
_USERS_PER_CALL = 256


@dataclasses.dataclass(frozen=True)
class RecommendConfig:
    """What to recommend, for whom and how to print it."""
    model_dir: str
    users: tuple[str, ...]
    users_file: str | None
    k: int = DEFAULT_K
    as_json: bool = False


@dataclasses.dataclass(frozen=True)
class Recommendation:
    rank: int
    movie_id: str
    title: str
    score: float
    # The rating model's predicted rating; None from an export without one.
    rating: float | None = None


@dataclasses.dataclass(frozen=True)
class UserRecommendations:
    """One user's list; fallback is True for a user unknown to the model."""
    user_id: str
    fallback: bool
    recommendations: tuple[Recommendation, ...]


def parse_args(argv: Sequence[str] | None) -> RecommendConfig:
    parser = argparse.ArgumentParser(
        prog='recommend.py', allow_abbrev=False,
        description=__doc__.split('\n\n')[0])
    parser.add_argument('--model-dir', required=True,
                        help='model dir holding export/, the export itself, or the '
                             'work dir (local path or gs://)')
    parser.add_argument('--user', action='append', default=[],
                        help='a raw user id, e.g. 196; repeat for several')
    parser.add_argument('--users-file',
                        help='a file with one user id per line (local or gs://)')
    parser.add_argument('-k', type=int, default=DEFAULT_K,
                        help=f'movies per user, 1..{MAX_K} (default {DEFAULT_K})')
    parser.add_argument('--json', action='store_true', dest='as_json',
                        help='print JSON instead of a table')
    logs.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    if not args.model_dir.strip():
        parser.error("--model-dir '' is empty; pass the trainer's model dir, "
                     'e.g. --model-dir workdir/model')
    if not 1 <= args.k <= MAX_K:
        parser.error(f'-k {args.k} is outside [1, {MAX_K}]; pass e.g. -k {DEFAULT_K}')
    users = tuple(user.strip() for user in args.user)
    if '' in users:
        parser.error("--user '' is empty; pass a raw user id, e.g. --user 196")
    if not users and not args.users_file:
        parser.error('no user given; pass --user ID (e.g. --user 196) or '
                     '--users-file FILE with one id per line')
    return RecommendConfig(model_dir=args.model_dir.rstrip('/'), users=users,
                           users_file=args.users_file, k=args.k,
                           as_json=args.as_json)


def find_export_dir(model_dir: str) -> str:
    """The SavedModel dir: model_dir itself, model_dir/export, or, for a work
    dir, WORK_DIR/model/export (logged, so the user learns the shorter flag).

    Raises:
      FileNotFoundError: if none holds a saved_model.pb.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    in_work_dir = features.join(features.default_model_dir(model_dir), features.EXPORT_DIR)
    candidates = (model_dir, features.join(model_dir, features.EXPORT_DIR), in_work_dir)
    for candidate in candidates:
        if tf.io.gfile.exists(features.join(candidate, 'saved_model.pb')):
            if candidate == in_work_dir:
                logger.info('%s is a work dir: serving its model, %s', model_dir, candidate)
            return candidate
    raise FileNotFoundError(
        f'no SavedModel in {", ".join(candidates)}; '
        'train first: .venv/bin/python -m trainer.task --work-dir WORK_DIR')


def read_users(path: str) -> list[str]:
    """User ids, one per line, blank lines skipped.

    Raises:
      FileNotFoundError: if the file does not exist.
      ValueError: if it holds no id.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f'--users-file {path} does not exist')
    with tf.io.gfile.GFile(path) as f:
        users = [line.strip() for line in f.read().splitlines()]
    users = [user for user in users if user]
    if not users:
        raise ValueError(f'--users-file {path} holds no user id (one per line)')
    return users


def load_recommender(export_dir: str):
    """The export's `recommend` concrete function.

    Raises:
      ValueError: if the export has no `recommend` signature.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    signatures = tf.saved_model.load(export_dir).signatures
    if features.RECOMMEND_SIGNATURE not in signatures:
        raise ValueError(
            f'the SavedModel in {export_dir} has no {features.RECOMMEND_SIGNATURE!r} '
            f'signature (it has {", ".join(sorted(signatures))}); re-export it with '
            '.venv/bin/python -m trainer.task --work-dir WORK_DIR')
    return signatures[features.RECOMMEND_SIGNATURE]


def recommend(signature, users: Sequence[str], k: int) -> list[UserRecommendations]:
    """Calls the signature on batches of users; drops padding entries."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    results = []
    for start in range(0, len(users), _USERS_PER_CALL):
        batch = list(users[start:start + _USERS_PER_CALL])
        outputs = {name: value.numpy() for name, value in signature(
            user_id=tf.constant(batch), k=tf.constant(k, tf.int32)).items()}
        for row, user_id in enumerate(batch):
            movie_ids = outputs[features.MOVIE_IDS][row]
            ratings = (outputs[features.PREDICTED_RATINGS][row]
                       if features.PREDICTED_RATINGS in outputs else [None] * len(movie_ids))
            results.append(UserRecommendations(
                user_id=user_id, fallback=bool(outputs[features.FALLBACK][row]),
                recommendations=tuple(
                    Recommendation(rank=rank + 1, movie_id=movie_id.decode('utf-8'),
                                   title=title.decode('utf-8'), score=float(score),
                                   rating=None if rating is None else float(rating))
                    for rank, (movie_id, title, score, rating) in enumerate(zip(
                        movie_ids, outputs[features.TITLES][row],
                        outputs[features.SCORES][row], ratings))
                    if movie_id)))
    return results


def format_table(results: Sequence[UserRecommendations]) -> str:
    """One block per user: a heading, then rank, movie id, title, score and
    predicted-rating columns."""
    blocks = []
    for result in results:
        heading = (f'user {result.user_id}: unknown to the model, so the best '
                   'movies for a newcomer' if result.fallback else
                   f'user {result.user_id}: best movies not rated in training')
        rows = [('rank', 'movie id', 'title', 'score', 'rating')] + [
            (str(item.rank), item.movie_id, item.title, f'{item.score:.2f}',
             '' if item.rating is None else f'{item.rating:.2f}')
            for item in result.recommendations]
        widths = [max(len(row[column]) for row in rows) for column in range(3)]
        lines = [heading] + [
            f'{rank:>{widths[0]}}  {movie_id:<{widths[1]}}  {title:<{widths[2]}}  '
            f'{score:>5}  {rating:>6}'.rstrip()
            for rank, movie_id, title, score, rating in rows]
        if not result.recommendations:
            lines.append('  (no movie left that the user has not rated)')
        blocks.append('\n'.join(lines))
    return '\n\n'.join(blocks)


def format_json(results: Sequence[UserRecommendations]) -> str:
    """A JSON list with one object per user; scores and ratings rounded to 4 decimals."""
    return json.dumps([
        {'user_id': result.user_id, 'fallback': result.fallback,
         'recommendations': [
             {'rank': item.rank, 'movie_id': item.movie_id, 'title': item.title,
              'score': round(item.score, 4),
              'rating': None if item.rating is None else round(item.rating, 4)}
             for item in result.recommendations]}
        for result in results], ensure_ascii=False, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    """Prints recommendations; returns the exit code (2 on a bad input)."""
    config = parse_args(argv)
    logs.setup_logging(verbose=logs.wants_verbose(argv))
    logs.quiet_startup(argv)
    try:
        users = list(config.users)
        if config.users_file:
            users += read_users(config.users_file)
        export_dir = find_export_dir(config.model_dir)
        signature = load_recommender(export_dir)
    except (FileNotFoundError, ValueError) as error:
        print(f'recommend.py: error: {error}', file=sys.stderr)
        return 2
    logger.info('Recommending %d movies each for %d users from %s',
                config.k, len(users), export_dir)
    results = recommend(signature, users, config.k)
    print(format_json(results) if config.as_json else format_table(results))
    return 0


if __name__ == '__main__':
    sys.exit(main())
