"""The serving image's server over real HTTP (trainer/serving/server.py).

The test starts the `serving` target's ENTRYPOINT from the Dockerfile (with
this interpreter for `python`) as a subprocess, with the variables Vertex AI
sets, against a small export with planted biases, and talks to it on
127.0.0.1 as Vertex's prediction service would.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
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
import tensorflow_transform as tft

from conftest import REPO
from test_export import _indices, _train_catalog, tft_dir  # pylint: disable=unused-import
from test_images import DOCKERFILE, stages
from trainer import features
from trainer.rating.model import MatrixFactorization
from trainer.serving import export

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


@pytest.fixture(scope='module')
def server(export_dir: str, tmp_path_factory) -> Iterator[Server]:
    port = free_port()
    env = {**os.environ, 'AIP_HTTP_PORT': str(port), 'AIP_HEALTH_ROUTE': HEALTH_ROUTE,
           'AIP_PREDICT_ROUTE': PREDICT_ROUTE, 'AIP_STORAGE_URI': export_dir,
           'PYTHONPATH': str(REPO)}
    log = tmp_path_factory.mktemp('log') / 'server.log'
    with open(log, 'wb') as out:
        process = subprocess.Popen(entrypoint(), env=env, cwd=log.parent, stdout=out,
                                   stderr=subprocess.STDOUT)
    running = Server(port)
    try:
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if running.request(HEALTH_ROUTE)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, 'the server did not start: ' + log.read_text()
            time.sleep(0.5)
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


def test_a_body_that_is_not_json_is_400(server: Server):
    status, reply = server.request(PREDICT_ROUTE, raw=b'{"instances": [')
    assert status == 400 and 'not JSON' in reply['error']
