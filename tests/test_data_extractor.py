"""Tests of data-extractor.py: staging, reuse, refusals, bad archives, no network, flags."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import logging
import pathlib
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator

import pytest

from conftest import REPO, load_script
from trainer import features
from trainer.pipeline import synthetic

extractor = load_script('data-extractor.py')

SYNTHETIC_FLAGS = ['--dataset', 'synthetic', '--num-users', '30', '--num-movies', '40',
                   '--num-ratings', '300']
# Three ratings and two titles per layout, written as the real files write them.
RATINGS_TEXT = {
    '\t': '1\t2\t4\t881250949\n1\t1\t3\t891717742\n2\t2\t5\t878887116\n',
    '::': '1::2::4.5::881250949\n1::1::3::891717742\n2::2::5::878887116\n',
    ',': 'userId,movieId,rating,timestamp\n1,2,4.5,881250949\n1,1,3.0,891717742\n'
         '2,2,5.0,878887116\n',
}
MOVIES_TEXT = {
    '|': '1|Amélie (2001)|01-Jan-2001||http://us.imdb.com/M/title-exact?Am%E9lie|'
         + '|'.join('0' * 19) + '\n2|Heat (1995)|01-Jan-1995||x|' + '|'.join('0' * 19) + '\n',
    '::': '1::Amélie (2001)::Comedy|Romance\n2::Heat (1995)::Action\n',
    ',': 'movieId,title,genres\n1,Amélie (2001),Comedy|Romance\n'
         '2,"City of Lost Children, The (1995)",Drama\n',
}


def build_zip(path: pathlib.Path, layout: features.DatasetLayout,
              extra: dict[str, bytes] | None = None, ratings: bool = True) -> pathlib.Path:
    """A small zip in the GroupLens layout of `layout`, written by hand."""
    with zipfile.ZipFile(path, 'w') as archive:
        if ratings:
            archive.writestr(layout.ratings_member, RATINGS_TEXT[layout.ratings_separator])
        archive.writestr(layout.movies_member, MOVIES_TEXT[layout.movies_separator].encode(
            layout.movies_encoding))
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return path


def md5_of(path: pathlib.Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def raw_files(work_dir: str) -> set[str]:
    raw = pathlib.Path(features.raw_dir(work_dir))
    return {path.name for path in raw.iterdir()} if raw.exists() else set()


def error_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.fixture(autouse=True)
def info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


@pytest.fixture
def closed_port() -> int:
    """A 127.0.0.1 port that nothing listens on: connecting fails at once."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


@pytest.fixture
def http_root(tmp_path: pathlib.Path) -> Iterator[tuple[pathlib.Path, str]]:
    """A directory served over HTTP on 127.0.0.1, and its base URL."""
    root = tmp_path / 'served'
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize('layout_name', ['ml-100k', 'ml-25m'])
def test_synthetic_is_staged_end_to_end(
        work_dir: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture,
        layout_name: str) -> None:
    layout = features.DATASETS[layout_name]

    code = extractor.main(['--work-dir', work_dir, *SYNTHETIC_FLAGS,
                           '--synthetic-layout', layout_name])

    assert code == 0
    assert raw_files(work_dir) == {layout.ratings_file, layout.movies_file,
                                   features.TRUTH_FILE, features.SOURCE_FILE}
    config = synthetic.SyntheticConfig(num_users=30, num_movies=40, num_ratings=300,
                                       layout=layout_name)
    expected = tmp_path / 'expected.zip'
    truth = synthetic.write_archive(str(expected), config)
    info = features.read_source_info(work_dir)
    assert (info.dataset, info.layout, info.md5) == ('synthetic', layout_name, md5_of(expected))
    raw = pathlib.Path(features.raw_dir(work_dir))
    assert json.loads((raw / features.TRUTH_FILE).read_text()) == truth
    with zipfile.ZipFile(expected) as archive:
        assert (raw / layout.ratings_file).read_bytes() == archive.read(layout.ratings_member)
    summary = capsys.readouterr().out
    assert f'Staged synthetic (layout {layout_name})' in summary
    assert '300 ratings' in summary


def test_selection_bias_reaches_the_staged_truth(
        work_dir: str, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture) -> None:
    code = extractor.main(['--work-dir', work_dir, *SYNTHETIC_FLAGS, '--selection-bias', '2'])

    assert code == 0
    config = synthetic.SyntheticConfig(num_users=30, num_movies=40, num_ratings=300,
                                       selection_bias=2.0)
    expected = tmp_path / 'expected.zip'
    truth = synthetic.write_archive(str(expected), config)
    raw = pathlib.Path(features.raw_dir(work_dir))
    staged = json.loads((raw / features.TRUTH_FILE).read_text())
    assert staged == truth and staged['selection_bias'] == 2.0
    with zipfile.ZipFile(expected) as archive:
        assert (raw / 'u.data').read_bytes() == archive.read(features.ML_100K.ratings_member)
    info = features.read_source_info(work_dir)
    assert info.md5 == md5_of(expected) and 'selection_bias=2.0' in info.source
    assert any('selection bias 2' in message for message in caplog.messages)
    assert 'selection_bias=2.0' in capsys.readouterr().out


@pytest.mark.parametrize('as_url', [False, True], ids=['path', 'file-url'])
@pytest.mark.parametrize('layout_name', sorted(features.DATASETS))
def test_hand_built_zip_is_staged(work_dir: str, tmp_path: pathlib.Path,
                                  layout_name: str, as_url: bool) -> None:
    layout = features.DATASETS[layout_name]
    path = build_zip(tmp_path / f'custom-{layout_name}.zip', layout)
    source = path.as_uri() if as_url else str(path)

    code = extractor.main(['--work-dir', work_dir, '--dataset', layout_name,
                           '--data-sources', source])

    assert code == 0
    raw = pathlib.Path(features.raw_dir(work_dir))
    assert raw_files(work_dir) == {layout.ratings_file, layout.movies_file,
                                   features.SOURCE_FILE}
    assert (raw / layout.ratings_file).read_text() == RATINGS_TEXT[layout.ratings_separator]
    assert (raw / layout.movies_file).read_text(layout.movies_encoding) == \
        MOVIES_TEXT[layout.movies_separator]
    assert features.read_source_info(work_dir) == features.SourceInfo(
        dataset=layout_name, layout=layout_name, source=str(path), md5=md5_of(path))


def test_rerun_reuses_without_rewriting(
        work_dir: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    assert extractor.main(['--work-dir', work_dir, *SYNTHETIC_FLAGS]) == 0
    raw = pathlib.Path(features.raw_dir(work_dir))
    before = {path.name: path.stat().st_mtime_ns for path in raw.iterdir()}
    caplog.clear()
    capsys.readouterr()

    assert extractor.main(['--work-dir', work_dir, *SYNTHETIC_FLAGS]) == 0

    assert {path.name: path.stat().st_mtime_ns for path in raw.iterdir()} == before
    assert any(message.startswith('reusing synthetic') for message in caplog.messages)
    assert not any('generating' in message for message in caplog.messages)
    assert 'Reused synthetic' in capsys.readouterr().out


def test_other_staged_data_is_refused_unless_overwrite(
        work_dir: str, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    assert extractor.main(['--work-dir', work_dir, *SYNTHETIC_FLAGS]) == 0
    staged = raw_files(work_dir)
    path = build_zip(tmp_path / 'custom.zip', features.DATASETS['ml-1m'])
    flags = ['--work-dir', work_dir, '--dataset', 'ml-1m', '--data-sources', str(path)]

    assert extractor.main(flags) == 1
    [message] = error_records(caplog)
    assert 'already holds synthetic' in message and '--overwrite' in message
    assert raw_files(work_dir) == staged

    assert extractor.main([*flags, '--overwrite']) == 0
    assert raw_files(work_dir) == {'ratings.dat', 'movies.dat', features.SOURCE_FILE}
    assert any('--overwrite: deleting' in message for message in caplog.messages)
    assert features.read_source_info(work_dir).dataset == 'ml-1m'


def test_files_without_source_json_are_refused(
        work_dir: str, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = pathlib.Path(features.raw_dir(work_dir))
    raw.mkdir()
    (raw / 'u.data.tmp').write_text('1\t2\t')  # what an interrupted run leaves
    path = build_zip(tmp_path / 'custom.zip', features.ML_100K)

    code = extractor.main(['--work-dir', work_dir, '--data-sources', str(path)])

    assert code == 1
    [message] = error_records(caplog)
    assert 'no source.json' in message and '--overwrite' in message


def bad_archive(kind: str, path: pathlib.Path) -> pathlib.Path:
    layout = features.ML_100K
    if kind == 'md5-mismatch':  # named like the official archive, other bytes
        return build_zip(path.with_name('ml-100k.zip'), layout)
    if kind == 'not-a-zip':
        path.write_text('<html>Not Found</html>')
        return path
    if kind == 'missing-ratings':
        return build_zip(path, layout, ratings=False)
    if kind == 'truncated-zip':  # an interrupted copy: the central directory is gone
        content = build_zip(path, layout).read_bytes()
        path.write_bytes(content[:len(content) * 3 // 5])
        return path
    if kind == 'corrupt-member':  # intact directory, one flipped byte in u.data
        content = bytearray(build_zip(path, layout).read_bytes())
        content[content.index(RATINGS_TEXT['\t'].encode()) + 5] ^= 0x01
        path.write_bytes(bytes(content))
        return path
    entry = '../evil.txt' if kind == 'dot-dot-entry' else '/tmp/evil.txt'
    return build_zip(path, layout, extra={entry: b'escaped'})


@pytest.mark.parametrize('kind, phrase', [
    ('md5-mismatch', 'should have 0e33842e24a9c977be4e0107933c0723'),
    ('not-a-zip', 'is not a zip archive'),
    ('truncated-zip', 'is not a zip archive'),
    ('corrupt-member', 'is corrupt: ml-100k/u.data cannot be unpacked (Bad CRC-32'),
    ('missing-ratings', 'has no ml-100k/u.data'),
    ('dot-dot-entry', "'../evil.txt'"),
    ('absolute-entry', "'/tmp/evil.txt'"),
])
def test_bad_archive_fails_with_one_line_and_stages_nothing(
        work_dir: str, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture,
        kind: str, phrase: str) -> None:
    path = bad_archive(kind, tmp_path / 'custom.zip')

    code = extractor.main(['--work-dir', work_dir, '--dataset', 'ml-100k',
                           '--data-sources', str(path)])

    assert code == 1
    [message] = error_records(caplog)
    assert phrase in message and '\n' not in message
    assert raw_files(work_dir) == set()
    assert not (tmp_path / 'evil.txt').exists()


def test_a_corrupt_archive_with_overwrite_keeps_the_old_staging(
        work_dir: str, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    assert extractor.main(['--work-dir', work_dir, *SYNTHETIC_FLAGS]) == 0
    raw = pathlib.Path(features.raw_dir(work_dir))
    before = {path.name: path.read_bytes() for path in raw.iterdir()}
    path = bad_archive('corrupt-member', tmp_path / 'custom.zip')

    code = extractor.main(['--work-dir', work_dir, '--dataset', 'ml-100k',
                           '--data-sources', str(path), '--overwrite'])

    assert code == 1
    [message] = error_records(caplog)
    assert 'is corrupt' in message
    assert {path.name: path.read_bytes() for path in raw.iterdir()} == before
    assert extractor.main(['--work-dir', work_dir, *SYNTHETIC_FLAGS]) == 0  # still reusable
    assert any(message.startswith('reusing synthetic') for message in caplog.messages)


class _CutOffHandler(http.server.BaseHTTPRequestHandler):
    """Promises a whole zip in Content-Length, sends 60% of it and hangs up."""
    body = b''

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        self.send_response(200)
        self.send_header('Content-Length', str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body[:len(self.body) * 3 // 5])
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def test_a_download_cut_short_fails_and_stages_nothing(
        work_dir: str, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    handler = type('Handler', (_CutOffHandler,), {
        'body': build_zip(tmp_path / 'custom.zip', features.ML_100K).read_bytes()})
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f'http://127.0.0.1:{server.server_address[1]}/custom.zip'
    try:
        code = extractor.main(['--work-dir', work_dir, '--data-sources', url])
    finally:
        server.shutdown()
        server.server_close()

    assert code == 1
    [message] = error_records(caplog)
    size = (tmp_path / 'custom.zip').stat().st_size
    assert f'stopped after {size * 3 // 5} of {size} bytes' in message
    assert raw_files(work_dir) == set()


def test_download_without_network_names_both_ways_forward(
        work_dir: str, closed_port: int, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    offline = dataclasses.replace(
        features.ML_100K, url=f'http://127.0.0.1:{closed_port}/ml-100k.zip')
    monkeypatch.setitem(features.DATASETS, 'ml-100k', offline)

    code = extractor.main(['--work-dir', work_dir, '--dataset', 'ml-100k'])

    assert code == 1
    [message] = error_records(caplog)
    assert message.startswith(f'cannot download {offline.url}')
    assert '--dataset synthetic' in message and '--data-sources PATH' in message
    assert '\n' not in message
    assert 'Traceback' not in caplog.text + capsys.readouterr().err
    assert raw_files(work_dir) == set()


def _serve_ml_100k(root: pathlib.Path, base_url: str,
                   monkeypatch: pytest.MonkeyPatch) -> features.DatasetLayout:
    """ml-100k.zip over HTTP, as the table's official URL with its MD5."""
    path = build_zip(root / 'ml-100k.zip', features.ML_100K)
    official = dataclasses.replace(
        features.ML_100K, url=f'{base_url}/ml-100k.zip', md5=md5_of(path))
    monkeypatch.setitem(features.DATASETS, 'ml-100k', official)
    return official


def test_download_from_official_url_checks_md5(
        work_dir: str, http_root: tuple[pathlib.Path, str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    official = _serve_ml_100k(*http_root, monkeypatch)

    code = extractor.main(['--work-dir', work_dir])

    assert code == 0
    assert features.read_source_info(work_dir).source == official.url
    assert '(verified)' in capsys.readouterr().out
    assert raw_files(work_dir) == {'u.data', 'u.item', features.SOURCE_FILE}


def _serve_ml_32m(root: pathlib.Path, base_url: str, monkeypatch: pytest.MonkeyPatch,
                  checksum: str | None = None) -> None:
    """ml-32m.zip and ml-32m.zip.md5 (holding checksum, default the zip's MD5) over HTTP."""
    path = build_zip(root / 'ml-32m.zip', features.DATASETS['ml-32m'])
    # "MD5 (name) = digest", as BSD md5 writes it; md5sum's "digest  name" reads too.
    (root / 'ml-32m.zip.md5').write_text(f'MD5 (ml-32m.zip) = {checksum or md5_of(path)}\n')
    served = dataclasses.replace(features.DATASETS['ml-32m'], url=f'{base_url}/ml-32m.zip')
    monkeypatch.setitem(features.DATASETS, 'ml-32m', served)


def test_ml_32m_is_checked_against_the_published_checksum(
        work_dir: str, http_root: tuple[pathlib.Path, str], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    root, base_url = http_root
    _serve_ml_32m(root, base_url, monkeypatch)

    assert features.DATASETS['ml-32m'].md5 is None  # known only from the checksum file
    assert extractor.main(['--work-dir', work_dir, '--dataset', 'ml-32m']) == 0

    assert '(verified)' in capsys.readouterr().out
    assert any('ml-32m.zip.md5' in message for message in caplog.messages)
    assert raw_files(work_dir) == {'ratings.csv', 'movies.csv', features.SOURCE_FILE}


@pytest.mark.parametrize('checksum, phrase', [
    ('0' * 32, 'should have 00000000000000000000000000000000'),
    ('not a checksum', 'holds 0 MD5 digests'),
])
def test_ml_32m_with_a_bad_published_checksum_stages_nothing(
        work_dir: str, http_root: tuple[pathlib.Path, str], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, checksum: str, phrase: str) -> None:
    root, base_url = http_root
    _serve_ml_32m(root, base_url, monkeypatch, checksum)

    assert extractor.main(['--work-dir', work_dir, '--dataset', 'ml-32m']) == 1

    [message] = error_records(caplog)
    assert phrase in message and '\n' not in message
    assert raw_files(work_dir) == set()


def test_a_published_checksum_must_agree_with_the_known_one(
        work_dir: str, http_root: tuple[pathlib.Path, str], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    official = _serve_ml_100k(*http_root, monkeypatch)
    (http_root[0] / 'ml-100k.zip.md5').write_text(f'{"1" * 32}  ml-100k.zip\n')

    assert extractor.main(['--work-dir', work_dir]) == 1

    [message] = error_records(caplog)
    assert f'gives MD5 {"1" * 32}, but ml-100k is known as {official.md5}' in message
    assert raw_files(work_dir) == set()


def test_a_local_copy_is_checked_against_the_checksum_beside_it(
        work_dir: str, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    path = build_zip(tmp_path / 'ml-32m.zip', features.DATASETS['ml-32m'])
    (tmp_path / 'ml-32m.zip.md5').write_text('f' * 32 + '\n')

    assert extractor.main(['--work-dir', work_dir, '--dataset', 'ml-32m',
                           '--data-sources', str(path)]) == 1
    assert 'should have ' + 'f' * 32 in error_records(caplog)[0]


@pytest.mark.parametrize('argv, phrase', [
    (['--dataset', 'ml-7k'], "argument --dataset: invalid choice: 'ml-7k'"),
    (['--num-users', '5'], '--num-users 5: applies only to --dataset synthetic'),
    (['--dataset', 'synthetic', '--num-users', '0'], '--num-users 0: must be >= 1'),
    (['--dataset', 'synthetic', '--num-ratings', '10'], 'num_ratings 10 must lie in'),
    (['--selection-bias', '2'], '--selection-bias 2.0: applies only to --dataset synthetic'),
    (['--dataset', 'synthetic', '--selection-bias', '-1'],
     '--selection-bias -1.0: must be a finite number >= 0'),
    (['--dataset', 'synthetic', '--selection-bias', 'nan'],
     '--selection-bias nan: must be a finite number >= 0'),
    (['--dataset', 'synthetic', '--data-sources', 'x.zip'], '--data-sources x.zip: --dataset'),
    (['--data-sources', '/no/such/ml-100k.zip'], 'no such file'),
    (['--data-sources', 'ftp://host/ml-100k.zip'], 'scheme ftp:// is not supported'),
    (['--download-timeout', '0'], '--download-timeout 0.0: must be > 0'),
    (['--num-movies', 'many', '--dataset', 'synthetic'], "invalid int value: 'many'"),
])
def test_bad_flags_fail_with_one_line(
        work_dir: str, capsys: pytest.CaptureFixture, argv: list[str], phrase: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        extractor.main(['--work-dir', work_dir, *argv])

    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert phrase in last_line
    assert raw_files(work_dir) == set()


def test_runs_as_a_script(tmp_path: pathlib.Path) -> None:
    work_dir = tmp_path / 'work'
    result = subprocess.run(
        [sys.executable, str(REPO / 'data-extractor.py'), '--work-dir', str(work_dir),
         *SYNTHETIC_FLAGS], capture_output=True, text=True, timeout=120, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('Staged synthetic (layout ml-100k)')
    assert (work_dir / 'raw' / features.SOURCE_FILE).exists()
