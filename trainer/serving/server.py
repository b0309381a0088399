"""The prediction server of the `serving` image: Vertex AI's custom-container contract.

Owns the HTTP side of serving the SavedModel that `trainer.serving.export` writes.
Vertex AI starts the container with:

- `AIP_HTTP_PORT`: the port to listen on (default 8080);
- `AIP_HEALTH_ROUTE`: answers GET with 200 once the model is loaded;
- `AIP_PREDICT_ROUTE`: answers POST `{"instances": [...], "parameters": {...}}`
  with `{"predictions": [...]}`, one prediction per instance, in order;
- `AIP_STORAGE_URI`: where Vertex copied the model's artifacts (a gs:// path;
  `--model-dir` overrides it).

Both signatures go through the one predict route:

- `serving_default` (the default): instances `{"user_id": "196", "movie_id":
  "242"}`; each prediction is the predicted rating, a number.
- `recommend`: `"parameters": {"signature_name": "recommend", "k": 10}` and
  instances `{"user_id": "196"}`; each prediction is `{"movie_ids": [...],
  "titles": [...], "scores": [...], "fallback": false}`, best first, padding
  dropped (see `trainer.serving.export`).

Ids may be strings or integers (MovieLens ids are numbers).  A bad request
gets 400 and `{"error": "..."}` naming what to fix.  The server runs the
TensorFlow that trained the model: it is the same image stack.

The HTTP side is uvicorn (keep-alive HTTP/1.1 on one event loop) with a
Starlette app.  Requests are parsed and checked on the loop; the signature
calls run on two model threads, and the requests that arrive while both
are busy are answered by the next call together (`trainer.batching`: one
call per signature and k, at most 256 instances), so concurrent
clients share the cost of a call instead of queueing for the model one by
one.  A lone request is never held back to wait for company.  On SIGTERM
(Vertex scaling down, a rollout) the server stops listening, closes idle
connections, lets the requests in flight finish (at most `--drain-seconds`)
and exits 0.  See docs/cloud.md#serving and docs/performance.md.

    python -m trainer.serving [--model-dir DIR] [--port N] [--host H] [--drain-seconds S]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from trainer import features
from trainer import logs
from trainer.serving import export
from trainer.serving.batching import Batcher, Call

logger = logging.getLogger(__name__)

ENV_HTTP_PORT = 'AIP_HTTP_PORT'
ENV_HEALTH_ROUTE = 'AIP_HEALTH_ROUTE'
ENV_PREDICT_ROUTE = 'AIP_PREDICT_ROUTE'
ENV_STORAGE_URI = 'AIP_STORAGE_URI'
DEFAULT_PORT = 8080
DEFAULT_HEALTH_ROUTE = '/health'
DEFAULT_PREDICT_ROUTE = '/predict'
DEFAULT_K = 10
MAX_K = 10_000
# Vertex AI refuses online requests above 1.5 MB; a little slack for headers.
MAX_BODY_BYTES = 2 * 1024 * 1024
# Vertex AI does not document how long a prediction container has between
# SIGTERM and SIGKILL; its nodes run on Kubernetes, whose default is 30 s.
DEFAULT_DRAIN_SECONDS = 20.0
# Connections waiting to be accepted; with socketserver's 5, clients at 32
# connections waited seconds for a retry or were reset.  The kernel caps it
# at net.core.somaxconn (4096).
LISTEN_BACKLOG = 2048
# Google Cloud's load balancers keep an idle connection to a backend for up
# to 600 s and ask backends to keep theirs longer, so that a backend never
# closes one the balancer is about to reuse; Vertex does not say what its
# front end does, so the server follows that rule.
KEEP_ALIVE_SECONDS = 620
# On SIGTERM an idle keep-alive connection closes after this long without a
# request (see DrainingProtocol).
IDLE_CLOSE_SECONDS = 1.0


class BadRequest(ValueError):
    """A request the server answers with 400 and this message."""


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """Where the model is and how the server is reached."""
    model_dir: str
    host: str = '0.0.0.0'
    port: int = DEFAULT_PORT
    health_route: str = DEFAULT_HEALTH_ROUTE
    predict_route: str = DEFAULT_PREDICT_ROUTE
    drain_seconds: float = DEFAULT_DRAIN_SECONDS


def _id_column(instances: Sequence[Any], key: str) -> list[str]:
    """The `key` of every instance as a string id."""
    column = []
    for position, instance in enumerate(instances):
        if not isinstance(instance, dict) or key not in instance:
            raise BadRequest(f'instance {position} has no "{key}"; send objects such as '
                             '{"user_id": "196", "movie_id": "242"}')
        value = instance[key]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise BadRequest(f'instance {position}: "{key}" is {json.dumps(value)}, '
                             'not a string or integer id')
        column.append(str(value))
    return column


def _requested_k(parameters: Mapping[str, Any]) -> int:
    k = parameters.get(features.RECOMMEND_K, DEFAULT_K)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise BadRequest(f'parameters.k is {json.dumps(k)}; pass an integer from 1 to '
                         f'{MAX_K}, such as {DEFAULT_K}')
    return k


class Predictor:
    """Runs the SavedModel's signatures on parsed request bodies."""

    def __init__(self, model_dir: str) -> None:
        self._model = tf.saved_model.load(model_dir)
        self.signatures = dict(self._model.signatures)
        if export.SIGNATURE not in self.signatures:
            raise ValueError(f'{model_dir} has no {export.SIGNATURE} signature; '
                             'export it with python -m trainer.task')
        logger.info('Loaded %s (signatures: %s)', model_dir, ', '.join(sorted(self.signatures)))

    def parse(self, body: Any) -> Call | None:
        """{"instances": [...], "parameters": {...}} -> its Call; None for no instances.

        Raises:
          BadRequest: the body does not follow the contract in the module doc.
        """
        if not isinstance(body, dict) or not isinstance(body.get('instances'), list):
            raise BadRequest('the body must be a JSON object with a list "instances"')
        parameters = body.get('parameters') or {}
        if not isinstance(parameters, dict):
            raise BadRequest('"parameters" must be a JSON object')
        name = parameters.get('signature_name', export.SIGNATURE)
        served = {export.SIGNATURE, features.RECOMMEND_SIGNATURE} & set(self.signatures)
        if name not in served:
            raise BadRequest(f'parameters.signature_name {json.dumps(name)} is not served; '
                             f'use one of: {", ".join(sorted(served))}')
        instances = body['instances']
        if name == features.RECOMMEND_SIGNATURE:
            k = _requested_k(parameters)
            return Call(name, {features.USER_ID: _id_column(instances, features.USER_ID)},
                        k) if instances else None
        return Call(name, {key: _id_column(instances, key)
                           for key in (features.USER_ID, features.MOVIE_ID)}
                    ) if instances else None

    def run(self, calls: Sequence[Call]) -> list[list[Any]]:
        """Each call's predictions, from one signature call over all their rows.

        Raises:
          ValueError: the calls do not share one key.
        """
        if len({call.key for call in calls}) != 1:
            raise ValueError(f'one batch holds calls of {len({c.key for c in calls})} kinds')
        signature, k = calls[0].key
        inputs = {key: tf.constant([value for call in calls for value in call.columns[key]])
                  for key in calls[0].columns}
        if signature == features.RECOMMEND_SIGNATURE:
            predictions = self._recommendations(inputs, k)
        else:
            predictions = [float(value) for value in
                           self.signatures[signature](**inputs)[features.RATING].numpy()]
        split, start = [], 0
        for call in calls:
            split.append(predictions[start:start + call.rows])
            start += call.rows
        return split

    def predict(self, body: Any) -> dict[str, list[Any]]:
        """One request body, on its own: {"predictions": [...]}.

        Raises:
          BadRequest: the body does not follow the contract in the module doc.
        """
        call = self.parse(body)
        return {'predictions': self.run([call])[0] if call else []}

    def _recommendations(self, inputs: Mapping[str, tf.Tensor], k: int) -> list[dict[str, Any]]:
        """Each row's list: whole columns to Python at once, then one slice per list.

        Raises:
          ValueError: a list has padding before a movie (the export pads the end only).
        """
        outputs = {name: value.numpy() for name, value in
                   self.signatures[features.RECOMMEND_SIGNATURE](
                       **inputs, k=tf.constant(k, tf.int32)).items()}
        listed = outputs[features.MOVIE_IDS].astype(bool)  # padding is b''
        if not (listed[:, :-1] >= listed[:, 1:]).all():
            raise ValueError('the recommend signature padded a list before its end')
        columns = {name: outputs[name].tolist() for name in (
            features.MOVIE_IDS, features.TITLES, features.SCORES,
            features.PREDICTED_RATINGS) if name in outputs}
        strings = {features.MOVIE_IDS, features.TITLES}
        # Element by element, this took 0.9 ms of CPU for 100 users with an
        # iALS list model (the signature itself 2.3 ms), all of it holding the
        # GIL; whole columns and slices take 0.25 ms.
        return [{**{name: (list(map(bytes.decode, column[row][:length])) if name in strings
                           else column[row][:length]) for name, column in columns.items()},
                 features.FALLBACK: fallback}
                for row, (length, fallback) in enumerate(zip(
                    listed.sum(axis=1).tolist(), outputs[features.FALLBACK].tolist()))]


class DrainingProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, but one that lets requests already sent finish on SIGTERM.

    uvicorn closes a connection with no request running at once, and so
    drops the requests that a busy server has received but not yet parsed,
    or that a client is sending at that moment.  Here, from the shutdown on,
    every request is answered with `Connection: close`, and a connection with
    no request running closes only once it has been idle for
    IDLE_CLOSE_SECONDS.
    """
    draining = False

    def shutdown(self) -> None:
        self.draining = True
        if self.cycle is None or self.cycle.response_complete:
            self.loop.call_later(IDLE_CLOSE_SECONDS, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.draining and self.cycle is not None:
            self.cycle.keep_alive = False

    def _close_if_idle(self) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()


def _json(status: int, payload: Mapping[str, Any]) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False).encode('utf-8'), status,
                    media_type='application/json; charset=utf-8')


async def _read_body(request: Request) -> bytes:
    """The request body, refused past MAX_BODY_BYTES before it is all read."""
    length = request.headers.get('content-length', '')
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise BadRequest(f'the body is {length} bytes; send at most {MAX_BODY_BYTES} '
                         'per request')
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BadRequest(f'the body is over {MAX_BODY_BYTES} bytes; send at most that '
                             'per request')
        chunks.append(chunk)
    return b''.join(chunks)


def make_app(predictor: Predictor, config: ServingConfig) -> Starlette:
    """The ASGI app: GET health, POST predict; any other route is a JSON 404."""
    batcher = Batcher(predictor.run)

    async def health(request: Request) -> Response:
        del request
        return _json(200, {'status': 'ok'})

    async def predict(request: Request) -> Response:
        try:
            raw = await _read_body(request)
            try:
                body = json.loads(raw or b'null')
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise BadRequest(f'the body is not JSON: {error}') from error
            except RecursionError as error:
                raise BadRequest('the body is JSON nested too deep; send '
                                 '{"instances": [...]}') from error
            call = predictor.parse(body)
        except BadRequest as error:
            return _json(400, {'error': str(error)})
        if call is None:
            return _json(200, {'predictions': []})
        try:
            return _json(200, {'predictions': await batcher.submit(call)})
        except Exception as error:  # pylint: disable=broad-except
            logger.exception('predict failed on a request of %d instances', call.rows)
            return _json(500, {'error': f'the model failed: {error}'})

    async def http_error(request: Request, error: Exception) -> Response:
        status = error.status_code if isinstance(error, HTTPException) else 500
        message = (f'no route {request.method} {request.url.path}' if status in (404, 405)
                   else str(error))
        return _json(404 if status == 405 else status, {'error': message})

    return Starlette(routes=[Route(config.health_route, health, methods=['GET']),
                             Route(config.predict_route, predict, methods=['POST'])],
                     exception_handlers={HTTPException: http_error})


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> ServingConfig:
    """Flags first, then Vertex AI's AIP_* variables, then the defaults."""
    parser = argparse.ArgumentParser(prog='python -m trainer.serving',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--model-dir', default=environ.get(ENV_STORAGE_URI) or None,
                        help=f'the SavedModel (default: ${ENV_STORAGE_URI})')
    parser.add_argument('--host', default='0.0.0.0', help='address to bind (default 0.0.0.0)')
    parser.add_argument('--port', default=environ.get(ENV_HTTP_PORT) or str(DEFAULT_PORT),
                        help=f'port (default: ${ENV_HTTP_PORT} or {DEFAULT_PORT})')
    parser.add_argument('--drain-seconds', type=float, default=DEFAULT_DRAIN_SECONDS,
                        help='on SIGTERM, how long requests in flight may take to finish '
                        f'(default {DEFAULT_DRAIN_SECONDS:g})')
    args = parser.parse_args(argv)
    if not args.model_dir:
        parser.error(f'no model: pass --model-dir DIR or set {ENV_STORAGE_URI} '
                     '(Vertex AI sets it to the uploaded model\'s artifacts)')
    if not args.port.isdigit() or not 0 < int(args.port) < 65536:
        parser.error(f'port {args.port!r} (--port or {ENV_HTTP_PORT}) is not 1-65535; '
                     f'pass e.g. --port {DEFAULT_PORT}')
    if not 0 <= args.drain_seconds <= 3600:
        parser.error(f'--drain-seconds {args.drain_seconds:g} is not 0-3600; pass e.g. '
                     f'--drain-seconds {DEFAULT_DRAIN_SECONDS:g}')
    return ServingConfig(
        model_dir=args.model_dir, host=args.host, port=int(args.port),
        health_route=environ.get(ENV_HEALTH_ROUTE) or DEFAULT_HEALTH_ROUTE,
        predict_route=environ.get(ENV_PREDICT_ROUTE) or DEFAULT_PREDICT_ROUTE,
        drain_seconds=args.drain_seconds)


def main(argv: Sequence[str] | None = None) -> int:
    """Loads the model, then serves until SIGTERM or SIGINT; returns the exit code."""
    logs.setup_logging()
    config = parse_args(argv, os.environ)
    try:
        predictor = Predictor(config.model_dir)
    except (OSError, ValueError) as error:
        print(f'serving: error: cannot load {config.model_dir}: {error}', file=sys.stderr)
        return 2
    # TensorFlow and the model are some 400,000 Python objects: a full
    # collection over them stalls every request for 0.3-0.4 s.  They live as
    # long as the process, so they leave the collector's view.
    gc.freeze()
    try:
        listener = socket.create_server((config.host, config.port), backlog=LISTEN_BACKLOG)
    except OSError as error:
        print(f'serving: error: cannot listen on {config.host}:{config.port}: {error}; '
              f'pass a free --port (or set {ENV_HTTP_PORT})', file=sys.stderr)
        return 2
    server = uvicorn.Server(uvicorn.Config(
        make_app(predictor, config), http=DrainingProtocol, backlog=LISTEN_BACKLOG,
        timeout_keep_alive=KEEP_ALIVE_SECONDS, timeout_graceful_shutdown=config.drain_seconds,
        lifespan='off', access_log=False, log_config=None, server_header=False))
    stopped_by: list[int] = []
    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again to the
    # handler it found: this one notes it, so the process exits 0.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda number, frame: stopped_by.append(number))
    logger.info('Serving on %s:%d (health %s, predict %s)', config.host,
                listener.getsockname()[1], config.health_route, config.predict_route)
    server.run(sockets=[listener])
    logger.info('Stopped by %s', ' and '.join(sorted({signal.Signals(number).name
                                                      for number in stopped_by})) or 'uvicorn')
    return 0

if __name__ == '__main__':
    sys.exit(main())
