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

    python -m trainer.serving [--model-dir DIR] [--port N] [--host H]
"""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from trainer import features, logs
from trainer.serving import export

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

    def predict(self, body: Any) -> dict[str, list[Any]]:
        """{"instances": [...], "parameters": {...}} -> {"predictions": [...]}.

        Raises:
          BadRequest: the body does not follow the contract in the module doc.
        """
        if not isinstance(body, dict) or not isinstance(body.get('instances'), list):
            raise BadRequest('the body must be a JSON object with a list "instances"')
        parameters = body.get('parameters') or {}
        if not isinstance(parameters, dict):
            raise BadRequest('"parameters" must be a JSON object')
        name = parameters.get('signature_name', export.SIGNATURE)
        handlers: dict[str, Callable[[list[Any], Mapping[str, Any]], list[Any]]] = {
            export.SIGNATURE: self._ratings,
            features.RECOMMEND_SIGNATURE: self._recommendations}
        if name not in handlers or name not in self.signatures:
            raise BadRequest(f'parameters.signature_name {json.dumps(name)} is not served; '
                             f'use one of: {", ".join(sorted(set(handlers) & set(self.signatures)))}')
        if not body['instances']:
            return {'predictions': []}
        return {'predictions': handlers[name](body['instances'], parameters)}

    def _ratings(self, instances: list[Any], parameters: Mapping[str, Any]) -> list[float]:
        del parameters  # serving_default takes none
        outputs = self.signatures[export.SIGNATURE](
            user_id=tf.constant(_id_column(instances, features.USER_ID)),
            movie_id=tf.constant(_id_column(instances, features.MOVIE_ID)))
        return [float(value) for value in outputs[features.RATING].numpy()]

    def _recommendations(self, instances: list[Any],
                         parameters: Mapping[str, Any]) -> list[dict[str, Any]]:
        outputs = {name: value.numpy() for name, value in
                   self.signatures[features.RECOMMEND_SIGNATURE](
                       user_id=tf.constant(_id_column(instances, features.USER_ID)),
                       k=tf.constant(_requested_k(parameters), tf.int32)).items()}
        predictions = []
        for row, fallback in enumerate(outputs[features.FALLBACK]):
            kept = [i for i, movie_id in enumerate(outputs[features.MOVIE_IDS][row]) if movie_id]
            predictions.append({
                features.MOVIE_IDS: [outputs[features.MOVIE_IDS][row][i].decode('utf-8')
                                     for i in kept],
                features.TITLES: [outputs[features.TITLES][row][i].decode('utf-8')
                                  for i in kept],
                features.SCORES: [float(outputs[features.SCORES][row][i]) for i in kept],
                **({features.PREDICTED_RATINGS: [
                    float(outputs[features.PREDICTED_RATINGS][row][i]) for i in kept]}
                   if features.PREDICTED_RATINGS in outputs else {}),
                features.FALLBACK: bool(fallback)})
        return predictions


def make_handler(predictor: Predictor, config: ServingConfig
                 ) -> type[http.server.BaseHTTPRequestHandler]:
    """The request handler class bound to one predictor and its routes."""

    class Handler(http.server.BaseHTTPRequestHandler):
        """GET health, POST predict; everything else is 404."""
        protocol_version = 'HTTP/1.1'

        def _reply(self, status: int, payload: Mapping[str, Any]) -> None:
            data = json.dumps(payload, ensure_ascii=False).encode('utf-8')
            self.send_response(status)
            self.send_header('Content-Type', 'application/json; charset=utf-8')
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # pylint: disable=invalid-name
            if self.path == config.health_route:
                self._reply(200, {'status': 'ok'})
            else:
                self._reply(404, {'error': f'no route {self.path}'})

        def do_POST(self) -> None:  # pylint: disable=invalid-name
            if self.path != config.predict_route:
                self._reply(404, {'error': f'no route {self.path}'})
                return
            try:
                length = int(self.headers.get('Content-Length') or 0)
                if length > MAX_BODY_BYTES:
                    raise BadRequest(f'the body is {length} bytes; send at most '
                                     f'{MAX_BODY_BYTES} per request')
                body = json.loads(self.rfile.read(length) or b'null')
                self._reply(200, predictor.predict(body))
            except json.JSONDecodeError as error:
                self._reply(400, {'error': f'the body is not JSON: {error}'})
            except (BadRequest, ValueError) as error:
                self._reply(400, {'error': str(error)})

        def log_message(self, format: str, *args: Any) -> None:  # pylint: disable=redefined-builtin
            logger.info('%s %s', self.address_string(), format % args)

    return Handler


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> ServingConfig:
    """Flags first, then Vertex AI's AIP_* variables, then the defaults."""
    parser = argparse.ArgumentParser(prog='python -m trainer.serving',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--model-dir', default=environ.get(ENV_STORAGE_URI) or None,
                        help=f'the SavedModel (default: ${ENV_STORAGE_URI})')
    parser.add_argument('--host', default='0.0.0.0', help='address to bind (default 0.0.0.0)')
    parser.add_argument('--port', default=environ.get(ENV_HTTP_PORT) or str(DEFAULT_PORT),
                        help=f'port (default: ${ENV_HTTP_PORT} or {DEFAULT_PORT})')
    args = parser.parse_args(argv)
    if not args.model_dir:
        parser.error(f'no model: pass --model-dir DIR or set {ENV_STORAGE_URI} '
                     '(Vertex AI sets it to the uploaded model\'s artifacts)')
    if not args.port.isdigit() or not 0 < int(args.port) < 65536:
        parser.error(f'port {args.port!r} (--port or {ENV_HTTP_PORT}) is not 1-65535; '
                     f'pass e.g. --port {DEFAULT_PORT}')
    return ServingConfig(
        model_dir=args.model_dir, host=args.host, port=int(args.port),
        health_route=environ.get(ENV_HEALTH_ROUTE) or DEFAULT_HEALTH_ROUTE,
        predict_route=environ.get(ENV_PREDICT_ROUTE) or DEFAULT_PREDICT_ROUTE)


def main(argv: Sequence[str] | None = None) -> int:
    """Loads the model, then serves until stopped; returns the exit code."""
    logs.setup_logging()
    config = parse_args(argv, os.environ)
    try:
        predictor = Predictor(config.model_dir)
    except (OSError, ValueError) as error:
        print(f'serving: error: cannot load {config.model_dir}: {error}', file=sys.stderr)
        return 2
    server = http.server.ThreadingHTTPServer((config.host, config.port),
                                             make_handler(predictor, config))
    logger.info('Serving on %s:%d (health %s, predict %s)', config.host, server.server_port,
                config.health_route, config.predict_route)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info('Stopped')
    finally:
        server.server_close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
