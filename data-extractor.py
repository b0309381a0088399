"""Fetches, checks and stages one MovieLens archive under WORK_DIR/raw/.

Owns getting ratings into the work dir (a local path or gs://bucket/prefix,
written through trainer.fileio, which uses tf.io.gfile for gs://); never parses
or cleans rows (preprocess.py does). Usage::

    python data-extractor.py --work-dir DIR [--dataset ml-100k] [--data-sources URL_OR_PATH]
    python data-extractor.py --work-dir DIR --dataset synthetic [--num-ratings 100000 ...]

Where the archive comes from: the GroupLens URL in features.DATASETS, or
--data-sources (http(s) URL, local path, file:// URL or gs:// path of a zip in
the GroupLens layout of --dataset). `--dataset synthetic` writes one with
trainer.pipeline.synthetic (layout --synthetic-layout; planted model --synthetic-model,
by default `movielens`, calibrated as docs/data.md says), whose truth.json is
staged too.

Checks, before anything lands in raw/:
  * MD5, when the archive is named like the official one (ml-100k.zip): a
    download from the official URL, a mirror or a copy claims to be that
    archive, so it must match byte for byte.  The MD5s are the table's and
    the one GroupLens publishes beside the archive (ml-32m.zip.md5), read from
    beside the archive used (URL or path + .md5); when both exist they must
    agree.  A download whose published MD5 cannot be read falls back on the
    table's, and is refused when the table has none.  Any other name (a
    subset, a synthetic zip) has no known MD5: it is staged as is and its MD5
    recorded in source.json.
  * It is a zip holding the layout's ratings member, and no entry has an
    absolute path or '..' (such an archive is refused, not partly used).

Staging: the ratings member, and the movies and truth.json members when
present, are unpacked to .tmp names in raw/ (zip CRCs checked on the way; a
corrupt member removes them and fails), then, with --overwrite, the old
staging is deleted (source.json first), the .tmp files are renamed to their
basenames and raw/source.json (features.SourceInfo) is written last: it marks
a complete staging. A download shorter than its Content-Length fails. A
re-run for the same dataset and source reuses the staging and fetches
nothing; other staged data (or files without source.json, as a killed run
leaves) are refused unless --overwrite, so a bad new archive never costs the
old staging.

Exit status: 0 staged or reused, 1 a fetch or check failed (one error line),
2 bad flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.client
import logging
import math
import os
import posixpath
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Sequence

from trainer import features
from trainer import fileio
from trainer import logs
from trainer import shutdown
from trainer import usage
from trainer import worklock

if __name__ == '__main__':
    logs.check_packages()  # one line, not a traceback, outside .venv

from trainer.pipeline import synthetic  # noqa: E402  pylint: disable=wrong-import-position

logger = logging.getLogger(__name__)

_COPY_BYTES = 8 << 20
_PROGRESS_MIN_BYTES = 16 << 20
_REMOTE_SCHEMES = ('http', 'https', 'gs')
_WAYS_FORWARD = ('without network, pass --dataset synthetic, or fetch the zip elsewhere '
                 'and pass --data-sources PATH')
_SYNTHETIC_FLAGS = {'num_users': '--num-users', 'num_movies': '--num-movies',
                    'num_ratings': '--num-ratings', 'seed': '--seed',
                    'synthetic_layout': '--synthetic-layout',
                    'selection_bias': '--selection-bias',
                    'synthetic_model': '--synthetic-model'}


class ExtractError(Exception):
    """A failure the user can act on; main logs its message as one line."""


@dataclasses.dataclass(frozen=True)
class ExtractorConfig:
    """What to stage where.

    Attributes:
      work_dir: local path or gs://bucket/prefix; files land in WORK_DIR/raw/.
      dataset: a features.DATASET_CHOICES value.
      data_source: the archive to use instead of the GroupLens URL.
      overwrite: whether other staged data may be cleared.
      synthetic: what to generate; set exactly when dataset is 'synthetic'.
      download_timeout: seconds a download may wait for data.
    """
    work_dir: str
    dataset: str = features.DEFAULT_DATASET
    data_source: str | None = None
    overwrite: bool = False
    synthetic: synthetic.SyntheticConfig | None = None
    download_timeout: float = 60.0


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the archive comes from, as recorded in source.json.

    Attributes:
      location: URL or absolute path of the archive.
      layout: its file layout.
      expected_md5: the table's MD5 for an archive named like the official one.
      official_name: whether it is named like the official archive.
    """
    location: str
    layout: features.DatasetLayout
    expected_md5: str | None
    official_name: bool = False


@dataclasses.dataclass(frozen=True)
class Staged:
    """What raw/ holds after a run."""
    info: features.SourceInfo
    file_bytes: dict[str, int]
    rating_lines: int | None  # None when reused: nothing was read
    md5_verified: bool
    reused: bool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        epilog='Details: the docstring at the top of data-extractor.py.')
    parser.add_argument('--work-dir', required=True,
                        help='local directory or gs://bucket/prefix; files land in WORK_DIR/raw/')
    parser.add_argument('--dataset', choices=features.DATASET_CHOICES,
                        default=features.DEFAULT_DATASET, help='default: %(default)s')
    parser.add_argument('--data-sources', metavar='URL_OR_PATH',
                        help='zip in the GroupLens layout of --dataset, used instead of the '
                             'GroupLens URL: http(s) URL, local path, file:// URL or gs:// '
                             'path; MD5-checked when named like the official archive')
    parser.add_argument('--overwrite', action='store_true',
                        help='clear WORK_DIR/raw/ when it holds other staged data')
    parser.add_argument('--download-timeout', type=float, default=60.0, metavar='SECONDS',
                        help='give up a download that stalls this long (default: %(default)s)')
    defaults = synthetic.SyntheticConfig()
    logs.add_verbose_flag(parser)
    group = parser.add_argument_group('--dataset synthetic only')
    group.add_argument('--num-users', type=int, help=f'default: {defaults.num_users}')
    group.add_argument('--num-movies', type=int, help=f'default: {defaults.num_movies}')
    group.add_argument('--num-ratings', type=int, help=f'default: {defaults.num_ratings}')
    group.add_argument('--seed', type=int, help=f'default: {defaults.seed}')
    group.add_argument('--synthetic-layout', choices=tuple(features.DATASETS),
                       help=f'file layout and rating scale (default: {defaults.layout})')
    group.add_argument('--synthetic-model', choices=synthetic.SYNTHETIC_MODELS,
                       help='planted model: movielens (calibrated to the real archives, '
                            'see docs/data.md) or rank3 (the earlier one) '
                            f'(default: {defaults.model})')
    group.add_argument('--selection-bias', type=float,
                       help='how strongly users pick movies they like; 0 = independent of '
                            f'taste (default: {defaults.selection_bias})')
    return parser


def config_from_args(parser: argparse.ArgumentParser,
                     args: argparse.Namespace) -> ExtractorConfig:
    """Validates the flags; calls parser.error (exit 2) with one line on a bad one."""
    if not args.work_dir.strip():
        parser.error("--work-dir '': pass a local directory or gs://bucket/prefix")
    if args.download_timeout <= 0:
        parser.error(f'--download-timeout {args.download_timeout}: must be > 0 seconds')
    if args.dataset != features.SYNTHETIC:
        for name, flag in _SYNTHETIC_FLAGS.items():
            if getattr(args, name) is not None:
                parser.error(f'{flag} {getattr(args, name)}: applies only to --dataset '
                             f'synthetic, not {args.dataset}; drop it or pass --dataset synthetic')
        if args.data_sources is not None:
            check_data_source(parser, args.data_sources)
        return ExtractorConfig(
            work_dir=args.work_dir, dataset=args.dataset, data_source=args.data_sources,
            overwrite=args.overwrite, download_timeout=args.download_timeout)
    if args.data_sources is not None:
        parser.error(f'--data-sources {args.data_sources}: --dataset synthetic generates '
                     'its archive; drop --data-sources or pick the dataset it holds')
    return ExtractorConfig(
        work_dir=args.work_dir, dataset=args.dataset, overwrite=args.overwrite,
        synthetic=synthetic_config(parser, args), download_timeout=args.download_timeout)


def check_data_source(parser: argparse.ArgumentParser, value: str) -> None:
    scheme = urllib.parse.urlparse(value).scheme
    if scheme not in ('', 'file', *_REMOTE_SCHEMES):
        parser.error(f'--data-sources {value}: scheme {scheme}:// is not supported; '
                     'pass a local path or a file://, http(s):// or gs:// URL')
    if scheme in ('', 'file') and not os.path.isfile(local_path(value)):
        parser.error(f'--data-sources {value}: no such file; pass the path of a zip')


def synthetic_config(parser: argparse.ArgumentParser,
                     args: argparse.Namespace) -> synthetic.SyntheticConfig:
    chosen = {name: getattr(args, name) for name in _SYNTHETIC_FLAGS
              if getattr(args, name) is not None}
    for name, value in chosen.items():
        lowest = 0 if name in ('seed', 'selection_bias') else 1
        finite = 'a finite number ' if isinstance(value, float) else ''  # not nan or inf
        if name not in ('synthetic_layout', 'synthetic_model') and not lowest <= value < math.inf:
            parser.error(f'{_SYNTHETIC_FLAGS[name]} {value}: must be {finite}>= {lowest}')
    if 'synthetic_layout' in chosen:
        chosen['layout'] = chosen.pop('synthetic_layout')
    if 'synthetic_model' in chosen:
        chosen['model'] = chosen.pop('synthetic_model')
    sizes = {**dataclasses.asdict(synthetic.SyntheticConfig()), **chosen}
    try:
        return synthetic.SyntheticConfig(**chosen)
    except ValueError as error:
        parser.error(f"--num-users {sizes['num_users']} --num-movies {sizes['num_movies']} "
                     f"--num-ratings {sizes['num_ratings']}: {error}")


def local_path(location: str) -> str:
    """The absolute local path of a path or file:// URL."""
    parsed = urllib.parse.urlparse(location)
    path = urllib.request.url2pathname(parsed.path) if parsed.scheme == 'file' else location
    return os.path.abspath(path)


def resolve_source(config: ExtractorConfig) -> Source:
    """Where the archive comes from and which MD5 it must have, if any."""
    if config.synthetic is not None:
        settings = ','.join(f'{key}={value}' for key, value
                            in synthetic.config_fields(config.synthetic).items())
        return Source(location=f'{features.SYNTHETIC}:{settings}',
                      layout=features.DATASETS[config.synthetic.layout], expected_md5=None)
    layout = features.DATASETS[config.dataset]
    location = config.data_source or layout.url
    if urllib.parse.urlparse(location).scheme in _REMOTE_SCHEMES:
        name = posixpath.basename(urllib.parse.urlparse(location).path)
    else:
        location = local_path(location)
        name = os.path.basename(location)
    named_official = name == posixpath.basename(urllib.parse.urlparse(layout.url).path)
    return Source(location=location, layout=layout,
                  expected_md5=layout.md5 if named_official else None,
                  official_name=named_official)


def find_staged(work_dir: str, dataset: str, location: str,
                overwrite: bool) -> features.SourceInfo | None:
    """The staging to reuse; None when raw/ is free (or --overwrite will clear it).

    Raises:
      ExtractError: raw/ holds other data and overwrite is False.
    """
    raw_dir = features.raw_dir(work_dir)
    if not fileio.isdir(raw_dir) or not fileio.listdir(raw_dir) or overwrite:
        return None
    if not fileio.exists(features.join(raw_dir, features.SOURCE_FILE)):
        raise ExtractError(f'{raw_dir} holds files but no {features.SOURCE_FILE} (an '
                           'interrupted run?); pass --overwrite to clear it')
    staged = features.read_source_info(work_dir)
    if staged.dataset != dataset or staged.source != location:
        raise ExtractError(f'{raw_dir} already holds {staged.dataset} from {staged.source}; '
                           f'pass --overwrite to replace it with {dataset} from {location}')
    return staged


def obtain_archive(config: ExtractorConfig, source: Source, temp_dir: str) -> str:
    """Returns a local path of the zip: generated, downloaded, copied or as given."""
    if config.synthetic is not None:
        path = os.path.join(temp_dir, f'{features.SYNTHETIC}.zip')
        logger.info('generating %d synthetic ratings (layout %s, seed %d, selection bias %g)',
                    config.synthetic.num_ratings, config.synthetic.layout, config.synthetic.seed,
                    config.synthetic.selection_bias)
        synthetic.write_archive(path, config.synthetic)
        return path
    scheme = urllib.parse.urlparse(source.location).scheme
    if scheme not in _REMOTE_SCHEMES:
        return source.location
    path = os.path.join(temp_dir, posixpath.basename(
        urllib.parse.urlparse(source.location).path) or 'archive.zip')
    if scheme == 'gs':
        logger.info('copying %s', source.location)
        tf = logs.import_tensorflow()
        try:
            tf.io.gfile.copy(source.location, path, overwrite=True)
        except tf.errors.OpError as error:
            raise ExtractError(f'cannot copy {source.location}: {error.message}') from None
    else:
        download(source.location, path, config.download_timeout)
    return path


def download(url: str, path: str, timeout: float) -> None:
    """Streams url into the local file path, logging progress for big files.

    Raises:
      ExtractError: the server cannot be reached or the transfer breaks off.
    """
    logger.info('downloading %s', url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(path, 'wb') as out:
            total = int(response.headers.get('Content-Length') or 0)
            done, next_report = 0, total / 10
            while chunk := response.read(_COPY_BYTES):
                out.write(chunk)
                done += len(chunk)
                if total >= _PROGRESS_MIN_BYTES and done >= next_report:
                    logger.info('downloaded %d of %d MiB', done >> 20, total >> 20)
                    next_report += total / 10
    except (OSError, http.client.HTTPException) as error:
        reason = getattr(error, 'reason', None) or error
        raise ExtractError(f'cannot download {url} ({reason}); {_WAYS_FORWARD}') from None
    # http.client ends a chunked read quietly when the server closes early.
    if total and done != total:
        raise ExtractError(f'download of {url} stopped after {done} of {total} bytes '
                           '(connection cut?); run again to fetch it afresh')


def read_published_md5(location: str, timeout: float) -> str | None:
    """The MD5 in the checksum file beside an archive (location + '.md5').

    Returns:
      The lower-case hex digest; None when there is no such file.

    Raises:
      ExtractError: the file holds no single MD5, or a remote one cannot be read.
    """
    checksum = location + features.CHECKSUM_SUFFIX
    scheme = urllib.parse.urlparse(location).scheme
    try:
        if scheme in ('http', 'https'):
            with urllib.request.urlopen(checksum, timeout=timeout) as response:
                text = response.read(1 << 16).decode('utf-8', errors='replace')
        elif fileio.exists(checksum):
            with fileio.open_file(checksum) as stream:
                text = stream.read(1 << 16)
        else:
            return None
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise ExtractError(f'cannot fetch the checksum {checksum} (HTTP {error.code})') from None
    except (OSError, http.client.HTTPException) as error:
        reason = getattr(error, 'reason', None) or error
        raise ExtractError(f'cannot fetch the checksum {checksum} ({reason})') from None
    digests = set(re.findall(r'\b[0-9a-f]{32}\b', text.lower()))
    if len(digests) != 1:
        raise ExtractError(f'{checksum} holds {len(digests)} MD5 digests, not one; '
                           'is it a checksum file?')
    logger.info('read the published MD5 from %s', checksum)
    return digests.pop()


def expected_md5(source: Source, timeout: float) -> str | None:
    """The MD5 the archive must have: the table's or the published one (they must agree).

    Returns:
      None for an archive not named like the official one, or with no MD5 known.

    Raises:
      ExtractError: they disagree, or the checksum file cannot be read.
    """
    if not source.official_name:
        return None
    published = read_published_md5(source.location, timeout)
    known = source.expected_md5
    if published and known and published != known:
        raise ExtractError(f'{source.location}{features.CHECKSUM_SUFFIX} gives MD5 '
                           f'{published}, but {source.layout.name} is known as {known}: the '
                           'archive changed upstream, or the checksum file is wrong')
    return published or known


def file_md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, 'rb') as stream:
        while chunk := stream.read(_COPY_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def members_to_stage(path: str, source: Source) -> list[str]:
    """The archive members to stage: ratings, then movies and truth.json if present.

    Raises:
      ExtractError: not a zip, an entry escapes the target, or no ratings member.
    """
    if not zipfile.is_zipfile(path):
        raise ExtractError(f'{source.location} is not a zip archive (truncated, or an '
                           'error page instead of the archive?)')
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    unsafe = [name for name in names if is_unsafe(name)]
    if unsafe:
        raise ExtractError(f'{source.location} has entries with an absolute path or "..", '
                           f'e.g. {unsafe[0]!r}; refusing the whole archive')
    layout = source.layout
    if layout.ratings_member not in names:
        raise ExtractError(f'{source.location} has no {layout.ratings_member}, so it is not '
                           f'a {layout.name} archive (it holds {len(names)} entries)')
    truth = posixpath.join(posixpath.dirname(layout.ratings_member), features.TRUTH_FILE)
    if layout.movies_member not in names:
        logger.warning('%s has no %s: staging ratings without titles',
                       source.location, layout.movies_member)
    return [name for name in (layout.ratings_member, layout.movies_member, truth)
            if name in names]


def is_unsafe(name: str) -> bool:
    """Whether a zip entry name could land outside the directory it is unpacked in."""
    parts = name.replace('\\', '/').split('/')
    return name.startswith(('/', '\\')) or '..' in parts or ':' in parts[0]


def clear_raw_dir(raw_dir: str, keep: Sequence[str] = ()) -> None:
    """Deletes raw/ but `keep`, the completion marker first, so a crash leaves
    nothing that looks good."""
    if not fileio.isdir(raw_dir):
        return
    old = [name for name in fileio.listdir(raw_dir) if name not in keep]
    if not old:
        return
    logger.warning('--overwrite: deleting %d entries of %s', len(old), raw_dir)
    if features.SOURCE_FILE in old:
        fileio.remove(features.join(raw_dir, features.SOURCE_FILE))
    for name in old:
        path = features.join(raw_dir, name.rstrip('/'))
        if fileio.isdir(path):
            fileio.rmtree(path)
        elif fileio.exists(path):
            fileio.remove(path)


def stage_members(path: str, source: Source, members: list[str],
                  raw_dir: str) -> tuple[dict[str, int], int]:
    """Copies members into raw_dir as <basename>.tmp, checking each CRC on the way.

    Returns:
      Bytes per staged file name, and the ratings file's rating lines.

    Raises:
      ExtractError: a member is corrupt (bad CRC or deflate data); the .tmp
        files written so far are removed.
    """
    fileio.makedirs(raw_dir)
    layout = source.layout
    file_bytes, newlines, member = {}, 0, members[0]
    try:
        with zipfile.ZipFile(path) as archive:
            for member in members:
                name = posixpath.basename(member)
                size = 0
                with archive.open(member) as stream, \
                        fileio.open_file(_tmp_path(raw_dir, name), 'wb') as out:
                    while chunk := stream.read(_COPY_BYTES):
                        out.write(chunk)
                        size += len(chunk)
                        if member == layout.ratings_member:
                            newlines += chunk.count(b'\n')
                file_bytes[name] = size
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        for name in (*file_bytes, posixpath.basename(member)):
            if fileio.exists(_tmp_path(raw_dir, name)):
                fileio.remove(_tmp_path(raw_dir, name))
        raise ExtractError(f'{source.location} is corrupt: {member} cannot be unpacked '
                           f'({error}); fetch the archive again') from None
    return file_bytes, newlines - int(layout.ratings_header)


def remove_staged(raw_dir: str, names: Sequence[str]) -> None:
    """Removes the <name>.tmp files a stopped run wrote (SIGTERM), logging it."""
    leftovers = [name for name in names if fileio.exists(_tmp_path(raw_dir, name))]
    for name in leftovers:
        fileio.remove(_tmp_path(raw_dir, name))
    if leftovers:
        logger.warning('removed the unfinished %s from %s',
                       ', '.join(name + '.tmp' for name in leftovers), raw_dir)


def _tmp_path(raw_dir: str, name: str) -> str:
    return features.join(raw_dir, name + '.tmp')


def publish_members(raw_dir: str, names: Sequence[str]) -> None:
    """Renames each staged <name>.tmp to <name>."""
    for name in names:
        fileio.replace(_tmp_path(raw_dir, name), features.join(raw_dir, name))
        logger.info('staged %s', features.join(raw_dir, name))


def extract(config: ExtractorConfig) -> Staged:
    """Stages the configured archive in WORK_DIR/raw/, or reuses what is there.

    Raises:
      ExtractError: fetching or a check failed; raw/ then holds no new source.json.
    """
    source = resolve_source(config)
    raw_dir = features.raw_dir(config.work_dir)
    staged = find_staged(config.work_dir, config.dataset, source.location, config.overwrite)
    if staged is not None:
        logger.info('reusing %s already staged in %s from %s', staged.dataset, raw_dir,
                    staged.source)
        sizes = {name: fileio.size(features.join(raw_dir, name))
                 for name in sorted(fileio.listdir(raw_dir))}
        return Staged(info=staged, file_bytes=sizes, rating_lines=None,
                      md5_verified=source.expected_md5 == staged.md5, reused=True)
    with tempfile.TemporaryDirectory(prefix='data-extractor-') as temp_dir:
        path = obtain_archive(config, source, temp_dir)
        wanted = expected_md5(source, config.download_timeout)
        md5 = file_md5(path)
        if wanted is not None and md5 != wanted:
            raise ExtractError(f'{source.location} has MD5 {md5}, but {source.layout.name} '
                               f'should have {wanted}: corrupt or changed '
                               'download; fetch it again')
        members = members_to_stage(path, source)
        shutdown.raise_if_terminated()
        try:
            file_bytes, rating_lines = stage_members(path, source, members, raw_dir)
            shutdown.raise_if_terminated()
        except shutdown.Terminated:
            remove_staged(raw_dir, [posixpath.basename(member) for member in members])
            raise
    if config.overwrite:
        clear_raw_dir(raw_dir, keep=[name + '.tmp' for name in file_bytes])
    publish_members(raw_dir, list(file_bytes))
    info = features.SourceInfo(dataset=config.dataset, layout=source.layout.name,
                               source=source.location, md5=md5)
    features.write_json(features.join(raw_dir, features.SOURCE_FILE), info)
    return Staged(info=info, file_bytes=file_bytes, rating_lines=rating_lines,
                  md5_verified=wanted is not None, reused=False)


def format_summary(staged: Staged, work_dir: str, seconds: float) -> str:
    info = staged.info
    check = 'verified' if staged.md5_verified else 'no published MD5 to check'
    verb = 'Reused' if staged.reused else 'Staged'
    lines = [f'{verb} {info.dataset} (layout {info.layout}) in {features.raw_dir(work_dir)}, '
             f'{seconds:.1f} s',
             f'  source: {info.source}',
             f'  md5:    {info.md5} ({check})']
    for name, size in staged.file_bytes.items():
        count = (f', {staged.rating_lines:,} ratings' if staged.rating_lines is not None
                 and name == features.DATASETS[info.layout].ratings_file else '')
        lines.append(f'  file:   {name} ({size:,} bytes{count})')
    if staged.reused:
        lines.append('  nothing fetched: same dataset and source as staged before')
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    config = config_from_args(parser, parser.parse_args(argv))
    # Not logs.setup_logging: that replaces the root handlers, and this one has no
    # chatty libraries to quieten.
    logging.basicConfig(level=logging.DEBUG if logs.wants_verbose(argv) else logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    logs.quiet_startup(argv, load_tensorflow=False)  # TensorFlow loads for gs:// only
    start = time.monotonic()
    try:
        with shutdown.raise_on_sigterm(), \
                worklock.hold(config.work_dir, worklock.command_line(argv)), \
                usage.sampling(features.usage_path(config.work_dir, 'extract')):
            staged = extract(config)
    except (ExtractError, worklock.LockHeld) as error:
        logger.error('%s', error)
        return 1
    print(format_summary(staged, config.work_dir, time.monotonic() - start))
    return 0


if __name__ == '__main__':
    sys.exit(main())
