"""Benchmark: the prediction server under load, on loopback.

Owns the serving load test.  It starts a real server process (`python -m
trainer.serving`, the serving image's ENTRYPOINT) with the variables Vertex AI
sets, on a model it trains on generated data (or the export `--model-dir`
names), and sends it `recommend` requests from keep-alive connections on
127.0.0.1, as Vertex's front end does:

- each case is N connections sharing M requests, each request asking for the
  top k (10) of one user or of several users (`--cases 8:300:100`);
- before the cases, every user's list is asked for alone on one connection;
  every answer under load must be that list (movie ids equal, scores within
  1e-4), so a server that mixes up concurrent requests shows wrong answers;
- per case: requests/s, users/s, p50, p99 and max latency, and errors by kind
  (reset, refused, timeout, HTTP status, wrong answer).

Last, 32 clients send requests without pause and the server gets SIGTERM
2 s in: each client goes on until its connection is closed or refused, and
the answers after the signal, the requests cut before an answer, the
refused connections, the exit code and the seconds to exit are printed.

Bounded: at most M requests and `--max-seconds` per case, STOP_SECONDS for
the SIGTERM phase, to 127.0.0.1 only.  The client is one asyncio loop in this process
(it never imports TensorFlow), so it shares the machine's cores with the
server: on a shared machine, compare runs only at similar load (printed).

    .venv/bin/python bench/serving.py                       # trains a small model first
    .venv/bin/python bench/serving.py --model-dir W/model/export --cases 1:300,32:3000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger('bench.serving')

HOST = '127.0.0.1'
HEALTH_ROUTE = '/v1/endpoints/1/deployedModels/1/health'
PREDICT_ROUTE = '/v1/endpoints/1/deployedModels/1:predict'
DEFAULT_CASES = '1:300,8:2000,32:3000,64:3000,8:300:100'
START_SECONDS = 180.0
REQUEST_TIMEOUT_SECONDS = 30.0
STOP_SECONDS = 60.0
SCORE_RTOL = 1e-4
SIGTERM_CONNECTIONS = 32
# The small model: the synthetic ml-100k shape, a few epochs (speed, not quality).
TRAINER_FLAGS = ('--num-epochs', '3', '--posterior-samples', '0', '--topn-iterations', '2')


@dataclasses.dataclass(frozen=True)
class Case:
    """N keep-alive connections sharing M requests of U users each."""
    connections: int
    requests: int
    users_per_request: int = 1

    @property
    def label(self) -> str:
        users = f', {self.users_per_request} users/request' if self.users_per_request > 1 else ''
        return f'{self.connections} x {self.requests}{users}'


@dataclasses.dataclass
class CaseResult:
    """What one case measured."""
    case: Case
    seconds: float
    latencies: list[float]
    errors: collections.Counter
    load_before: float
    load_after: float

    @property
    def answered(self) -> int:
        return len(self.latencies)

    def percentile_ms(self, share: float) -> float:
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return 1000.0 * ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        return {
            'connections': self.case.connections, 'requests': self.case.requests,
            'users_per_request': self.case.users_per_request, 'answered': self.answered,
            'seconds': round(self.seconds, 3),
            'requests_per_second': round(self.answered / self.seconds, 1),
            'users_per_second': round(self.answered * self.case.users_per_request
                                      / self.seconds, 1),
            'p50_ms': round(self.percentile_ms(0.50), 2),
            'p99_ms': round(self.percentile_ms(0.99), 2),
            'max_ms': round(self.percentile_ms(1.0), 2),
            'errors': dict(self.errors), 'load_before': self.load_before,
            'load_after': self.load_after}


def parse_cases(text: str) -> list[Case]:
    """'1:300,8:2000:100' -> [Case(1, 300), Case(8, 2000, 100)]."""
    cases = []
    for item in text.split(','):
        parts = item.strip().split(':')
        if not 2 <= len(parts) <= 3 or not all(part.isdigit() and int(part) > 0
                                               for part in parts):
            raise ValueError(f'case {item!r} is not CONNECTIONS:REQUESTS[:USERS] with '
                             'positive integers, such as 32:3000 or 8:300:100')
        cases.append(Case(*(int(part) for part in parts)))
    return cases


def request_bytes(users: Sequence[str], k: int, route: str = PREDICT_ROUTE) -> bytes:
    """One keep-alive POST asking `recommend` for these users' top k."""
    body = json.dumps({'instances': [{'user_id': user} for user in users],
                       'parameters': {'signature_name': 'recommend', 'k': k}}).encode()
    return (f'POST {route} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n'
            f'Content-Length: {len(body)}\r\n\r\n').encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """(status, server keeps the connection, body) of one HTTP/1.1 response."""
    head = await reader.readuntil(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    status = int(lines[0].split(' ', 2)[1])
    headers = {}
    for line in lines[1:]:
        if ':' in line:
            name, value = line.split(':', 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get('content-length', '0')))
    return status, headers.get('connection', '').lower() != 'close', body


def same_list(answer: Any, expected: Mapping[str, Any]) -> bool:
    """The same movies in the same order, scores within SCORE_RTOL."""
    if not isinstance(answer, dict) or answer.get('movie_ids') != expected['movie_ids']:
        return False
    return all(math.isclose(got, want, rel_tol=SCORE_RTOL, abs_tol=SCORE_RTOL)
               for got, want in zip(answer['scores'], expected['scores']))


def users_of(index: int, per_request: int, users: Sequence[str]) -> list[str]:
    """The users of request `index`: consecutive ones, wrapping around."""
    return [users[(index * per_request + j) % len(users)] for j in range(per_request)]


async def _connection(port: int, jobs: collections.deque, case: Case, users: Sequence[str],
                      k: int, expected: Mapping[str, Any], deadline: float, route: str,
                      latencies: list[float], errors: collections.Counter,
                      stop_on_error: bool = False) -> None:
    """One client connection: takes requests from `jobs` until none are left.

    A refused or cut connection is counted and opened again, or, with
    `stop_on_error` (the server is stopping), ends this client.
    """
    reader = writer = None
    try:
        while jobs and time.monotonic() < deadline:
            index = jobs.popleft()
            asked = users_of(index, case.users_per_request, users)
            # A new connection's set-up counts in its first request's latency.
            started = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(HOST, port)
                    writer.get_extra_info('socket').setsockopt(
                        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                writer.write(request_bytes(asked, k, route))
                status, keep, body = await asyncio.wait_for(read_response(reader),
                                                            REQUEST_TIMEOUT_SECONDS)
                elapsed = time.perf_counter() - started
            except ConnectionRefusedError:
                errors['refused'] += 1
                writer = None
                if stop_on_error:
                    return
                continue
            except (ConnectionError, asyncio.IncompleteReadError):
                errors['reset'] += 1
                writer.close()
                writer = None
                if stop_on_error:
                    return
                continue
            except asyncio.TimeoutError:
                errors['timeout'] += 1
                writer.close()
                writer = None
                continue
            if not keep:
                writer.close()
                writer = None
            if status != 200:
                errors[f'HTTP {status}'] += 1
                continue
            predictions = json.loads(body).get('predictions')
            if not (isinstance(predictions, list) and len(predictions) == len(asked)
                    and all(same_list(got, expected[user])
                            for got, user in zip(predictions, asked))):
                errors['wrong answer'] += 1
                continue
            latencies.append(elapsed)
    finally:
        if writer is not None:
            writer.close()


async def _run_case(port: int, case: Case, users: Sequence[str], k: int,
                    expected: Mapping[str, Any], max_seconds: float, route: str
                    ) -> tuple[float, list[float], collections.Counter]:
    jobs = collections.deque(range(case.requests))
    latencies: list[float] = []
    errors: collections.Counter = collections.Counter()
    started = time.perf_counter()
    deadline = time.monotonic() + max_seconds
    await asyncio.gather(*(_connection(port, jobs, case, users, k, expected, deadline,
                                       route, latencies, errors)
                           for _ in range(case.connections)))
    if jobs:
        errors['not sent (--max-seconds)'] += len(jobs)
    return time.perf_counter() - started, latencies, errors


def run_case(port: int, case: Case, users: Sequence[str], k: int,
             expected: Mapping[str, Any], max_seconds: float,
             route: str = PREDICT_ROUTE) -> CaseResult:
    """Sends the case's requests to 127.0.0.1:port and checks every answer.

    `expected` maps each user to its list ({"movie_ids", "scores"}).
    """
    load_before = os.getloadavg()[0]
    seconds, latencies, errors = asyncio.run(
        _run_case(port, case, users, k, expected, max_seconds, route))
    return CaseResult(case, seconds, latencies, errors, load_before, os.getloadavg()[0])


def reference_lists(port: int, users: Sequence[str], k: int) -> dict[str, Any]:
    """Every user's list, asked for alone, one request after another."""
    async def ask() -> dict[str, Any]:
        reader, writer = await asyncio.open_connection(HOST, port)
        answers = {}
        try:
            for user in users:
                writer.write(request_bytes([user], k))
                status, _, body = await asyncio.wait_for(read_response(reader),
                                                         REQUEST_TIMEOUT_SECONDS)
                if status != 200:
                    raise RuntimeError(f'user {user}: HTTP {status}: {body[:200]!r}')
                (answers[user],) = json.loads(body)['predictions']
        finally:
            writer.close()
        return answers
    return asyncio.run(ask())


def sigterm_under_load(process: subprocess.Popen, port: int, connections: int,
                       users: Sequence[str], k: int, expected: Mapping[str, Any],
                       load_seconds: float = 2.0) -> dict[str, Any]:
    """SIGTERM while `connections` keep-alive clients send requests: what they saw.

    Each client sends until its connection is closed or refused.  Answers
    after the signal are requests the server let finish; "reset" counts
    requests whose connection closed before an answer (sent as the server
    closed it), "refused" new connections after the listener closed.
    """
    async def scenario() -> dict[str, Any]:
        jobs = collections.deque(range(10_000_000))
        latencies: list[float] = []
        errors: collections.Counter = collections.Counter()
        deadline = time.monotonic() + load_seconds + STOP_SECONDS
        clients = asyncio.gather(*(
            _connection(port, jobs, Case(connections, 1), users, k, expected, deadline,
                        PREDICT_ROUTE, latencies, errors, stop_on_error=True)
            for _ in range(connections)))
        await asyncio.sleep(load_seconds)
        answered_before = len(latencies)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await clients
        loop = asyncio.get_running_loop()
        try:
            code = await loop.run_in_executor(None, process.wait, STOP_SECONDS)
        except subprocess.TimeoutExpired:
            code = None
        return {'connections': connections, 'answered_before': answered_before,
                'answered_after': len(latencies) - answered_before, 'errors': dict(errors),
                'exit_code': code, 'exit_seconds': round(time.monotonic() - signalled, 2)}
    return asyncio.run(scenario())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f'http://{HOST}:{port}{HEALTH_ROUTE}', timeout=5) as reply:
            return reply.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


def start_server(model_dir: str, port: int, log_path: str,
                 module: str = 'trainer.serving', extra_args: Sequence[str] = ()
                 ) -> subprocess.Popen:
    """`python -m MODULE` as Vertex starts it, answering health when it returns.

    Raises:
      RuntimeError: the server exited or did not answer within START_SECONDS.
    """
    env = {**os.environ, 'AIP_HTTP_PORT': str(port), 'AIP_HEALTH_ROUTE': HEALTH_ROUTE,
           'AIP_PREDICT_ROUTE': PREDICT_ROUTE, 'AIP_STORAGE_URI': model_dir,
           'PYTHONPATH': os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')]))}
    with open(log_path, 'wb') as log:
        process = subprocess.Popen([sys.executable, '-m', module, '--host', HOST, *extra_args],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_SECONDS
    while not health(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f'the server did not start; its log {log_path}:\n'
                               + open(log_path, encoding='utf-8', errors='replace').read()[-2000:])
        time.sleep(0.25)
    return process


def stop_server(process: subprocess.Popen) -> tuple[int | None, float]:
    """SIGTERM, then (exit code, seconds to exit); None if it had to be killed."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        code = None
    return code, time.monotonic() - started


def train_small_model(work_dir: str) -> str:
    """Generated ml-100k-shaped ratings -> preprocess -> a short training; the export.

    A work dir that already holds an export is reused as it is.
    """
    export_dir = os.path.join(work_dir, 'model', 'export')
    if os.path.exists(os.path.join(export_dir, 'saved_model.pb')):
        logger.info('Reusing the export in %s', export_dir)
        return export_dir
    steps = [
        ['data-extractor.py', '--work-dir', work_dir, '--dataset', 'synthetic'],
        ['preprocess.py', '--work-dir', work_dir],
        ['-m', 'trainer.task', '--work-dir', work_dir, *TRAINER_FLAGS]]
    log_path = os.path.join(work_dir, 'train.log')
    os.makedirs(work_dir, exist_ok=True)
    for step in steps:
        logger.info('+ python %s', ' '.join(step))
        with open(log_path, 'ab') as log:
            if subprocess.call([sys.executable, *step], cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT) != 0:
                raise RuntimeError(f'{step[0]} failed; see {log_path}')
    return export_dir


def format_table(results: Sequence[CaseResult]) -> str:
    lines = ['| connections x requests | req/s | users/s | p50 ms | p99 ms | max ms | errors '
             '| load |', '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for result in results:
        row = result.summary()
        errors = ', '.join(f'{count} {kind}' for kind, count in sorted(result.errors.items()))
        lines.append(f'| {result.case.label} | {row["requests_per_second"]:,.0f} '
                     f'| {row["users_per_second"]:,.0f} | {row["p50_ms"]:.1f} '
                     f'| {row["p99_ms"]:.1f} | {row["max_ms"]:.1f} | {errors or 0} '
                     f'| {row["load_before"]:.1f} |')
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model-dir', help='an export to serve (default: train a small one)')
    parser.add_argument('--work-dir', help='where the small model is trained, or reused from '
                        'a run before (default: a temp dir, removed at the end)')
    parser.add_argument('--cases', default=DEFAULT_CASES,
                        help='CONNECTIONS:REQUESTS[:USERS_PER_REQUEST],... '
                        f'(default {DEFAULT_CASES})')
    parser.add_argument('--k', type=int, default=10, help='list length (default 10)')
    parser.add_argument('--num-users', type=int, default=943,
                        help='user ids 1..N are asked for (default 943, the ml-100k users)')
    parser.add_argument('--max-seconds', type=float, default=60.0,
                        help='stop sending a case after this long (default 60)')
    parser.add_argument('--server-module', default='trainer.serving',
                        help='python -m MODULE --host 127.0.0.1 is the server (default '
                        'trainer.serving); to measure another server the same way')
    parser.add_argument('--json-out', help='also write the results as JSON here')
    return parser


def run_all(args: argparse.Namespace, cases: Sequence[Case], temp_dir: str
            ) -> tuple[list[CaseResult], dict[str, Any]]:
    """Model, server, reference lists, the cases, then SIGTERM under load."""
    model_dir = args.model_dir or train_small_model(args.work_dir or temp_dir)
    port = free_port()
    process = start_server(model_dir, port, os.path.join(temp_dir, 'server.log'),
                           args.server_module)
    users = [str(user) for user in range(1, args.num_users + 1)]
    try:
        expected = reference_lists(port, users, args.k)
        results = []
        for case in cases:
            results.append(run_case(port, case, users, args.k, expected, args.max_seconds))
            logger.info('%s: %s', case.label, results[-1].summary())
        stopped = sigterm_under_load(process, port, SIGTERM_CONNECTIONS, users, args.k,
                                     expected)
    finally:
        if process.poll() is None:
            stop_server(process)
    return results, stopped


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cases = parse_cases(args.cases)
    except ValueError as error:
        parser.error(f'--cases: {error}')
    if not 1 <= args.k <= 1000:
        parser.error(f'--k {args.k} is not 1-1000; pass e.g. --k 10')
    if args.num_users < 1:
        parser.error(f'--num-users {args.num_users} is not positive; pass e.g. --num-users 943')
    if args.max_seconds <= 0:
        parser.error(f'--max-seconds {args.max_seconds:g} is not positive; pass e.g. '
                     '--max-seconds 60')
    temp_dir = tempfile.mkdtemp(prefix='bench-serving-')
    try:
        results, stopped = run_all(args, cases, temp_dir)
    except RuntimeError as error:
        print(f'bench/serving.py: error: {error}', file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    print(f'{args.server_module}, recommend k={args.k}, {os.cpu_count()} cores, load average '
          'before each case in the last column:')
    print(format_table(results))
    errors = collections.Counter(stopped['errors'])
    others = ', '.join(f'{count} {kind}' for kind, count in sorted(errors.items())
                       if kind not in ('reset', 'refused'))
    print(f'SIGTERM under load from {stopped["connections"]} connections: '
          f'{stopped["answered_after"]} requests answered after the signal, '
          f'{errors["reset"]} cut before an answer, {errors["refused"]} new connections '
          f'refused{", " + others if others else ""}; exit code {stopped["exit_code"]} '
          f'{stopped["exit_seconds"]:.2f} s after the signal')
    if args.json_out:
        with open(args.json_out, 'w', encoding='utf-8') as out:
            json.dump({'time': datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       'server': args.server_module, 'k': args.k, 'cores': os.cpu_count(),
                       'cases': [result.summary() for result in results],
                       'sigterm_under_load': stopped}, out, indent=1)
    bad = {kind for kind in stopped['errors'] if kind != 'refused'}
    return 0 if all(not result.errors for result in results) and not bad else 1


if __name__ == '__main__':
    sys.exit(main())
