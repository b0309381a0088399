"""The serving image's server over real HTTP (trainer/serving/server.py).

The test starts the `serving` target's ENTRYPOINT from the Dockerfile (with
this interpreter for `python`) as a subprocess, with the variables Vertex AI
sets, against a small export with planted biases, and talks to it on
127.0.0.1 as Vertex's prediction service would.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft

from conftest import REPO, load_script
from test_export import _indices, _train_catalog, tft_dir  # pylint: disable=unused-import
from test_images import DOCKERFILE, stages
from trainer import features
from trainer.rating.model import MatrixFactorization
from trainer.serving import export
from trainer.serving import server as server_lib
from trainer.serving.batching import Call

bench = load_script('bench/serving.py')

HEALTH_ROUTE = '/v1/endpoints/1/deployedModels/2/health'
PREDICT_ROUTE = '/v1/endpoints/1/deployedModels/2:predict'
GLOBAL_MEAN = 3.0
USER_BIAS = {'u1': 1.0, 'u2': -0.5}
MOVIE_BIAS = {'m1': 0.75, 'm2': -0.25, 'm3': 0.25}
# Polling for start-up (TensorFlow import and model load), not a timed assertion.
START_DEADLINE_SECONDS = 120


def export_planted_model(tft_dir: str, work_dir: pathlib.Path) -> str:
    """WORK_DIR/transformed (a copy of tft_dir) and an export in WORK_DIR/model/export
    whose rating is global mean + user bias + movie bias (factors zero)."""
    tft_copy = str(work_dir / features.TRANSFORMED_DIR)
    shutil.copytree(tft_dir, tft_copy)
    tft_output = tft.TFTransformOutput(tft_copy)
    users = tft_output.vocabulary_size_by_name(features.USER_VOCAB)
    movies = tft_output.vocabulary_size_by_name(features.MOVIE_VOCAB)
    model = MatrixFactorization(users, movies, num_factors=2, global_mean=GLOBAL_MEAN,
                                init_stddev=0.1, seed=1)
    user_bias = np.zeros(users + features.NUM_OOV_BUCKETS, np.float32)
    item_bias = np.zeros(movies + features.NUM_OOV_BUCKETS, np.float32)
    user_bias[_indices(tft_output, features.USER_VOCAB, list(USER_BIAS)).numpy()] = list(
        USER_BIAS.values())
    item_bias[_indices(tft_output, features.MOVIE_VOCAB, list(MOVIE_BIAS)).numpy()] = list(
        MOVIE_BIAS.values())
    model.set_weights(user_factors=np.zeros((users + features.NUM_OOV_BUCKETS, 2)),
                      item_factors=np.zeros((movies + features.NUM_OOV_BUCKETS, 2)),
                      user_bias=user_bias, item_bias=item_bias)
    return export.export_saved_model(
        model, tft_copy, features.join(str(work_dir), features.MODEL_DIR, features.EXPORT_DIR),
        1.0, 5.0, catalog=_train_catalog(tft_copy))


@pytest.fixture(scope='module')
def export_dir(tft_dir: str, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp('served')
    out = export_planted_model(tft_dir, root)
    shutil.rmtree(root / features.TRANSFORMED_DIR)  # served from the export alone
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def entrypoint() -> list[str]:
    """The serving target's ENTRYPOINT, with this interpreter as `python`."""
    (line,) = [line for line in stages(DOCKERFILE.read_text())['serving']
               if line.startswith('ENTRYPOINT')]
    command = json.loads(line[len('ENTRYPOINT'):])
    return [sys.executable if word == 'python' else word for word in command]


class Server:
    """The running server's address."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.base = f'http://127.0.0.1:{port}'

    def request(self, path: str, body: Any = None, raw: bytes | None = None
                ) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data,
                                     headers={'Content-Type': 'application/json'})
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                assert response.headers['Content-Type'].startswith('application/json')
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def predict(self, body: Any) -> tuple[int, Any]:
        return self.request(PREDICT_ROUTE, body)


def start_server(export_dir: str, log: pathlib.Path) -> tuple[subprocess.Popen, Server]:
    """The ENTRYPOINT with Vertex's variables, once it answers its health route."""
    port = free_port()
    env = {**os.environ, 'AIP_HTTP_PORT': str(port), 'AIP_HEALTH_ROUTE': HEALTH_ROUTE,
           'AIP_PREDICT_ROUTE': PREDICT_ROUTE, 'AIP_STORAGE_URI': export_dir,
           'PYTHONPATH': str(REPO)}
    with open(log, 'wb') as out:
        process = subprocess.Popen(entrypoint(), env=env, cwd=log.parent, stdout=out,
                                   stderr=subprocess.STDOUT)
    running = Server(port)
    deadline = time.monotonic() + START_DEADLINE_SECONDS
    while True:
        if process.poll() is not None:
            raise AssertionError(log.read_text())
        try:
            if running.request(HEALTH_ROUTE)[0] == 200:
                return process, running
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError('the server did not start: ' + log.read_text())
        time.sleep(0.5)


@pytest.fixture(scope='module')
def server(export_dir: str, tmp_path_factory) -> Iterator[Server]:
    process, running = start_server(export_dir,
                                    tmp_path_factory.mktemp('log') / 'server.log')
    try:
        yield running
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_health_answers_on_vertex_route_only(server: Server):
    assert server.request(HEALTH_ROUTE) == (200, {'status': 'ok'})
    assert server.request('/health')[0] == 404


def test_serving_default_predicts_the_planted_ratings(server: Server):
    status, body = server.predict({'instances': [
        {'user_id': 'u1', 'movie_id': 'm1'}, {'user_id': 'u2', 'movie_id': 'm2'},
        {'user_id': 'stranger', 'movie_id': 'm3'}, {'user_id': 'u1', 'movie_id': 'unseen'}]})
    assert status == 200
    assert list(body) == ['predictions']
    np.testing.assert_allclose(body['predictions'], [
        GLOBAL_MEAN + 1.0 + 0.75, GLOBAL_MEAN - 0.5 - 0.25, GLOBAL_MEAN + 0.25,
        GLOBAL_MEAN + 1.0], rtol=1e-6)


def test_integer_ids_are_ids(server: Server):
    status, body = server.predict({'instances': [{'user_id': 7, 'movie_id': 8}]})
    assert status == 200 and body['predictions'] == [pytest.approx(GLOBAL_MEAN)]


def test_recommend_lists_unrated_movies_best_first(server: Server):
    # Train ratings (test_export.RAW_ROWS): u2 rated m1 and m3, u4 rated m3.
    status, body = server.predict({
        'instances': [{'user_id': 'u4'}, {'user_id': 'u2'}, {'user_id': 'stranger'}],
        'parameters': {'signature_name': 'recommend', 'k': 2}})
    assert status == 200
    u4, u2, stranger = body['predictions']
    assert u4['movie_ids'] == ['m1', 'm2'] and u4['fallback'] is False
    np.testing.assert_allclose(u4['scores'], [GLOBAL_MEAN + 0.75, GLOBAL_MEAN - 0.25],
                               rtol=1e-6)
    assert u4['titles'] == ['Amélie (2001)', 'Léon (1994)']
    # Ranked by predicted rating here (an export without a top-N model): each
    # listed movie's rating is its score, clipped to the scale as served.
    np.testing.assert_allclose(u4['ratings'], np.clip(u4['scores'], 1.0, 5.0), rtol=1e-6)
    assert u2['movie_ids'] == ['m2']  # one unrated movie left: padding dropped
    assert stranger['fallback'] is True and len(stranger['movie_ids']) == 2
    assert stranger['scores'] == sorted(stranger['scores'], reverse=True)


def test_an_empty_request_gets_no_predictions(server: Server):
    assert server.predict({'instances': []}) == (200, {'predictions': []})


@pytest.mark.parametrize('body, named', [
    ({'instances': [{'user_id': 'u1'}]}, 'movie_id'),
    ({'instances': [{'user_id': None, 'movie_id': 'm1'}]}, 'user_id'),
    ({'rows': []}, 'instances'),
    ({'instances': [{'user_id': 'u1'}], 'parameters': {'signature_name': 'nope'}},
     'recommend'),
    ({'instances': [{'user_id': 'u1'}],
      'parameters': {'signature_name': 'recommend', 'k': 0}}, 'from 1 to'),
    ({'instances': [{'user_id': 'u1'}],
      'parameters': {'signature_name': 'recommend', 'k': 2 ** 40}}, 'from 1 to'),
])
def test_a_bad_request_is_400_naming_the_fix(server: Server, body: Any, named: str):
    status, reply = server.predict(body)
    assert status == 400
    assert named in reply['error']


@pytest.mark.parametrize('raw, named', [(b'{"instances": [', 'not JSON'),
                                        (b'\xff\xfe', 'not JSON'),
                                        (b'[' * 100_000, 'nested too deep')])
def test_a_body_that_is_not_json_is_400(server: Server, raw: bytes, named: str):
    status, reply = server.request(PREDICT_ROUTE, raw=raw)
    assert status == 400 and named in reply['error']


# The users of the load tests: every kind of list (none left, one, two, the
# newcomer's fallback, an integer-looking unknown id).
LOAD_USERS = ['u1', 'u2', 'u3', 'u4', 'stranger', '7']


def model_lists(export_dir: str, users: list[str], k: int) -> dict[str, dict[str, Any]]:
    """Each user's list as the SavedModel itself computes it, padding dropped."""
    outputs = tf.saved_model.load(export_dir).signatures[features.RECOMMEND_SIGNATURE](
        user_id=tf.constant(users), k=tf.constant(k, tf.int32))
    lists = {}
    for row, user in enumerate(users):
        kept = [i for i, movie_id in enumerate(outputs[features.MOVIE_IDS][row].numpy())
                if movie_id]
        lists[user] = {
            'movie_ids': [outputs[features.MOVIE_IDS][row, i].numpy().decode() for i in kept],
            'scores': [float(outputs[features.SCORES][row, i]) for i in kept]}
    return lists


def model_answers(export_dir: str, users: list[str], k: int) -> list[dict[str, Any]]:
    """The recommend signature's own rows for `users`, every field, padding dropped."""
    outputs = {name: value.numpy() for name, value in tf.saved_model.load(
        export_dir).signatures[features.RECOMMEND_SIGNATURE](
            user_id=tf.constant(users), k=tf.constant(k, tf.int32)).items()}
    answers = []
    for row in range(len(users)):
        kept = [i for i, movie_id in enumerate(outputs[features.MOVIE_IDS][row]) if movie_id]
        answers.append({name: [outputs[name][row][i] for i in kept] for name in (
            features.MOVIE_IDS, features.TITLES, features.SCORES, features.PREDICTED_RATINGS)})
        answers[-1][features.FALLBACK] = outputs[features.FALLBACK][row]
    return answers


def assert_model_answers(got: list[Any], expected: list[dict[str, Any]]) -> None:
    assert len(got) == len(expected)
    for answer, want in zip(got, expected):
        assert list(answer) == [features.MOVIE_IDS, features.TITLES, features.SCORES,
                                features.PREDICTED_RATINGS, features.FALLBACK]
        for name in (features.MOVIE_IDS, features.TITLES):
            assert answer[name] == [value.decode() for value in want[name]]
        for name in (features.SCORES, features.PREDICTED_RATINGS):
            np.testing.assert_allclose(answer[name], want[name], rtol=1e-6)
        assert answer[features.FALLBACK] is bool(want[features.FALLBACK])


# More users than one batch holds (trainer.serving.batching.MAX_BATCH_ROWS),
# with every kind of list, padding included (k = 3 is more than u2 has left).
MANY_USERS = [LOAD_USERS[i % len(LOAD_USERS)] for i in range(300)]


def test_a_request_larger_than_a_batch_gets_the_models_own_lists(server: Server,
                                                                export_dir: str):
    status, body = server.predict({'instances': [{'user_id': user} for user in MANY_USERS],
                                   'parameters': {'signature_name': 'recommend', 'k': 3}})
    assert status == 200
    assert min(len(answer[features.MOVIE_IDS]) for answer in body['predictions']) < 3
    assert_model_answers(body['predictions'], model_answers(export_dir, MANY_USERS, 3))


def test_calls_batched_together_get_each_their_own_lists(export_dir: str):
    # What a model thread does with a batch: one signature call over both
    # calls' rows, split back per call.
    predictor = server_lib.Predictor(export_dir)
    few = ['u4', 'stranger', 'u2']
    first, second = predictor.run([
        Call(features.RECOMMEND_SIGNATURE, {features.USER_ID: MANY_USERS}, 3),
        Call(features.RECOMMEND_SIGNATURE, {features.USER_ID: few}, 3)])
    assert_model_answers(first, model_answers(export_dir, MANY_USERS, 3))
    assert_model_answers(second, model_answers(export_dir, few, 3))


@pytest.mark.parametrize('case', [bench.Case(8, 240), bench.Case(4, 60, 5)],
                         ids=['8 connections', '4 connections x 5 users'])
def test_the_load_test_gets_the_models_own_lists(server: Server, export_dir: str,
                                                 case: bench.Case):
    # bench/serving.py's client, small: keep-alive connections, every answer
    # checked against the model's own output.
    expected = model_lists(export_dir, LOAD_USERS, k=2)
    result = bench.run_case(server.port, case, LOAD_USERS, 2, expected, max_seconds=120,
                            route=PREDICT_ROUTE)
    assert dict(result.errors) == {}
    assert result.answered == case.requests


def test_concurrent_requests_of_every_kind_get_their_own_answers(server: Server,
                                                                 export_dir: str):
    # Requests of both signatures and two k's at once: the server batches
    # concurrent calls of one kind, never across kinds or answers.
    lists = {k: model_lists(export_dir, LOAD_USERS, k) for k in (1, 3)}
    ratings = {('u1', 'm1'): GLOBAL_MEAN + 1.0 + 0.75, ('u2', 'm2'): GLOBAL_MEAN - 0.5 - 0.25,
               ('stranger', 'm3'): GLOBAL_MEAN + 0.25}

    def ask(index: int) -> bool:
        if index % 3 == 2:
            pairs = list(ratings)[index % len(ratings):] + list(ratings)[:index % len(ratings)]
            status, body = server.predict({'instances': [
                {'user_id': user, 'movie_id': movie} for user, movie in pairs]})
            return status == 200 and np.allclose(body['predictions'],
                                                 [ratings[pair] for pair in pairs], rtol=1e-6)
        k = 1 + 2 * (index % 2)
        users = [LOAD_USERS[(index + j) % len(LOAD_USERS)] for j in range(1 + index % 3)]
        status, body = server.predict({'instances': [{'user_id': user} for user in users],
                                       'parameters': {'signature_name': 'recommend', 'k': k}})
        return status == 200 and all(
            bench.same_list(got, lists[k][user]) for got, user in zip(body['predictions'], users))

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, range(120)))
    assert answers.count(False) == 0


def read_reply(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of one HTTP/1.1 response with a Content-Length."""
    data = b''
    while b'\r\n\r\n' not in data:
        chunk = sock.recv(65536)
        assert chunk, f'the connection closed after {data!r}'
        data += chunk
    head, _, body = data.partition(b'\r\n\r\n')
    (length,) = [int(line.split(b':')[1]) for line in head.split(b'\r\n')
                 if line.lower().startswith(b'content-length:')]
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f'the connection closed after {head + body!r}'
        body += chunk
    return head, body


def refused(port: int) -> bool:
    try:
        socket.create_connection(('127.0.0.1', port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_finishes_the_request_in_flight_then_exits_0(export_dir: str,
                                                             tmp_path: pathlib.Path):
    process, running = start_server(export_dir, tmp_path / 'server.log')
    try:
        idle = socket.create_connection(('127.0.0.1', running.port), timeout=60)
        idle.sendall(bench.request_bytes(['u4'], 2, PREDICT_ROUTE))
        assert read_reply(idle)[0].startswith(b'HTTP/1.1 200')  # now an idle keep-alive
        body = json.dumps({'instances': [{'user_id': 'u4'}],
                           'parameters': {'signature_name': 'recommend', 'k': 2}}).encode()
        busy = socket.create_connection(('127.0.0.1', running.port), timeout=60)
        busy.sendall(f'POST {PREDICT_ROUTE} HTTP/1.1\r\nHost: 127.0.0.1\r\n'
                     f'Content-Type: application/json\r\nContent-Length: {len(body)}\r\n'
                     'Expect: 100-continue\r\n\r\n'.encode())
        # 100 Continue: the handler runs and is reading the body, so the
        # request is in flight when the signal comes.
        assert busy.recv(65536) == b'HTTP/1.1 100 Continue\r\n\r\n'
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        while not refused(running.port):  # polling for the signal's effect
            assert time.monotonic() < deadline, (tmp_path / 'server.log').read_text()
            time.sleep(0.1)
        assert idle.recv(65536) == b''  # the idle connection was closed
        busy.sendall(body)
        head, payload = read_reply(busy)
        assert head.startswith(b'HTTP/1.1 200')
        assert b'connection: close' in head.lower()
        (answer,) = json.loads(payload)['predictions']
        assert answer['movie_ids'] == ['m1', 'm2']
        assert busy.recv(65536) == b''  # then the server closed it
        assert process.wait(timeout=START_DEADLINE_SECONDS) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert refused(running.port)
    assert 'Stopped by SIGTERM' in (tmp_path / 'server.log').read_text()


def test_a_port_in_use_is_one_line(export_dir: str, tmp_path: pathlib.Path):
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*entrypoint(), '--host', '127.0.0.1', '--port', str(port)],
            env={**os.environ, 'AIP_STORAGE_URI': export_dir, 'PYTHONPATH': str(REPO)},
            cwd=tmp_path, capture_output=True, text=True, timeout=START_DEADLINE_SECONDS,
            check=False)
    assert done.returncode == 2
    assert 'Traceback' not in done.stderr
    assert f'serving: error: cannot listen on 127.0.0.1:{port}' in done.stderr
    assert 'pass a free --port' in done.stderr.splitlines()[-1]


@pytest.mark.parametrize('flags, named', [
    (['--port', '0'], 'is not 1-65535'),
    (['--drain-seconds', '-1'], '--drain-seconds -1 is not 0-3600'),
    ([], 'pass --model-dir DIR or set AIP_STORAGE_URI')])
def test_bad_flags_are_one_line(flags: list[str], named: str,
                                capsys: pytest.CaptureFixture[str]):
    environ = {} if not flags else {'AIP_STORAGE_URI': 'gs://bucket/model'}
    with pytest.raises(SystemExit) as stopped:
        server_lib.parse_args(flags, environ)
    assert stopped.value.code == 2
    assert named in capsys.readouterr().err


def test_flags_and_vertex_variables_make_the_config():
    config = server_lib.parse_args(['--drain-seconds', '5'], {
        'AIP_STORAGE_URI': 'gs://bucket/model', 'AIP_HTTP_PORT': '9000',
        'AIP_HEALTH_ROUTE': HEALTH_ROUTE, 'AIP_PREDICT_ROUTE': PREDICT_ROUTE})
    assert config == server_lib.ServingConfig(
        model_dir='gs://bucket/model', port=9000, health_route=HEALTH_ROUTE,
        predict_route=PREDICT_ROUTE, drain_seconds=5.0)
