"""gs:// for the tests: a GCS emulator on loopback, a fault-injecting proxy in
front of it, and the settings that point gcsfs (etils.epath), tensorstore
(orbax) and array_record at them.

Three pieces, each usable alone:

* `Emulator`: `gcp-storage-emulator` (a test dependency) in a child process,
  `python tests/gcs.py serve`, patched where it falls short of GCS for these
  clients (see `_patch_emulator`): downloads carry the object's
  `x-goog-generation`/`x-goog-metageneration`, reads and writes honour the
  generation/metageneration preconditions (412, 304 as GCS answers), listings
  honour startOffset/endOffset/maxResults/pageToken/includeTrailingDelimiter,
  objects.move (gcsfs's rename) exists, suffix byte ranges work, empty media
  uploads work, and requests are served on threads (one at a time against
  the store). Written against gcp-storage-emulator 2026.7.19's internals.
  The child binds 127.0.0.1 only, keeps its data in memory, and exits by
  itself when the process that started it is gone or after `max_seconds`.
* `FaultProxy`: a plain HTTP reverse proxy on 127.0.0.1, on threads of the
  process that creates it, that forwards to the emulator unless a rule
  matches: answer with an HTTP status (503, 429, 500...), reset the
  connection (RST), close it without an answer, stall, or cut a response
  short, for the next N matching requests (or until cleared). It records every
  request it saw and every fault it injected. Rules can also be set over HTTP
  (POST /_proxy/rules) when the proxy runs in another process
  (`serve --proxy`).
* `client_env(url)`: the environment variables that send every client the
  project uses to `url` without credentials; `apply_in_process` sets them in
  this process (through pytest's monkeypatch) and drops the caches that would
  keep an earlier setting.

Nothing here imports a GCS client at module level: the child process must
start fast and the machinery must import where gcsfs is absent.
"""

import argparse
import base64
import collections
import contextlib
import http.client
import http.server
import importlib
import io
import itertools
import json
import os
import re
import select
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid

try:
  import pytest  # pylint: disable=g-import-not-at-top
except ImportError:  # The emulator's child process needs no pytest.
  pytest = None

HOST = '127.0.0.1'


# ---------------------------------------------------------------------------
# The settings clients need.


def client_env(url):
  """Environment variables that point every GCS client the project uses at
  `url` (http://127.0.0.1:PORT: the proxy, or the emulator itself), with no
  credentials and no network probes.

  * STORAGE_EMULATOR_HOST: gcsfs (etils.epath's gs:// backend without
    TensorFlow) and google-cloud-storage (orbax asks it whether a bucket has a
    hierarchical namespace when it deletes a gs:// step).
  * TENSORSTORE_GCS_HTTP_URL: tensorstore's `gcs` kvstore (orbax's arrays).
  * CLOUD_STORAGE_EMULATOR_ENDPOINT: google-cloud-cpp, which array_record's
    riegeli GcsReader is built on.
  * GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs/__init__.py, read once at
    import: gcsfs.GCSFileSystem is then core.GCSFileSystem, not
    extended_gcsfs.ExtendedGcsFileSystem, whose `_lookup_bucket_type` asks
    the Storage Control API over gRPC for each bucket's layout and does not
    cache a failed answer (`Don't cache UNKNOWN type`), each call retried up
    to 60 s (retry.DEFAULT_RETRY_CONFIG) with a 30 s RPC timeout.
  * FSSPEC_GCS_TOKEN=anon: fsspec's config (fsspec/config.py, read at fsspec
    import) gives GCSFileSystem token='anon': no google.auth.default(), no
    metadata-server probe, no Authorization header.
  * GOOGLE_AUTH_TOKEN_FOR_TESTING: tensorstore's first credential source
    (internal/oauth2/google_auth_provider.cc), before
    GOOGLE_APPLICATION_CREDENTIALS, the gcloud file and the GCE metadata
    probe: a fixed bearer token the emulator ignores.
  * EPATH_USE_TF=false: with TensorFlow installed (the test extra) etils.epath
    sends gs:// to tf.io.gfile, whose GCS client has www.googleapis.com built
    in and no emulator setting; without TensorFlow (the default install) it
    uses gcsfs anyway.
  """
  return {
      'STORAGE_EMULATOR_HOST': url,
      'TENSORSTORE_GCS_HTTP_URL': url,
      'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
      'FSSPEC_GCS_TOKEN': 'anon',
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
      'EPATH_USE_TF': 'false',
  }


def apply_in_process(monkeypatch, url):
  """Points this process's GCS clients at `url` for one test (monkeypatch
  undoes the settings; the caches are dropped again on the next call).

  Environment variables read once at import are set through their modules
  instead: fsspec's config dict (FSSPEC_GCS_TOKEN), fsspec's registry
  (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT: gs/gcs map to gcsfs.core's class) and
  etils.epath's cached TensorFlow check (EPATH_USE_TF). Cached filesystems
  (fsspec's instance cache, epath's lru_cache) are dropped so that the next
  gs:// call builds one with these settings. tensorstore reads
  TENSORSTORE_GCS_HTTP_URL when it opens a kvstore, but keeps the first
  credentials it found for the whole process.
  """
  for key, value in client_env(url).items():
    monkeypatch.setenv(key, value)
  for key in ('GOOGLE_APPLICATION_CREDENTIALS',):
    monkeypatch.delenv(key, raising=False)
  try:
    import fsspec.config  # pylint: disable=g-import-not-at-top
    import gcsfs.core  # pylint: disable=g-import-not-at-top
  except ImportError:
    pass
  else:
    # (fsspec.registry, the attribute, is the read-only view of the module's
    # dict of classes.)
    registry = importlib.import_module('fsspec.registry')
    monkeypatch.setitem(fsspec.config.conf, 'gcs',
                        {**fsspec.config.conf.get('gcs', {}), 'token': 'anon'})
    for name in ('gs', 'gcs'):
      monkeypatch.setitem(registry._registry, name,  # pylint: disable=protected-access
                          gcsfs.core.GCSFileSystem)
    monkeypatch.setattr(gcsfs, 'GCSFileSystem', gcsfs.core.GCSFileSystem)
  clear_client_caches()


def clear_client_caches():
  """Drops the gs:// filesystems cached in this process: fsspec's instance
  cache of gcsfs (both classes) and etils.epath's lru_cache of them, and the
  listing caches that come with them."""
  with contextlib.suppress(ImportError):
    import gcsfs.core  # pylint: disable=g-import-not-at-top
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    with contextlib.suppress(ImportError):
      import gcsfs.extended_gcsfs  # pylint: disable=g-import-not-at-top
      gcsfs.extended_gcsfs.ExtendedGcsFileSystem.clear_instance_cache()
  with contextlib.suppress(ImportError):
    from etils.epath import backend  # pylint: disable=g-import-not-at-top
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    from etils.epath import gpath  # pylint: disable=g-import-not-at-top
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access


# ---------------------------------------------------------------------------
# The emulator, patched.

_LOCK = threading.Lock()  # The emulator's store is not thread-safe.


class _Precondition(Exception):

  def __init__(self, status, message=''):
    super().__init__(message)
    self.status = status
    self.message = message


def _int_query(request, name):
  values = request.query.get(name)
  if not values:
    return None
  try:
    return int(values[0])
  except ValueError:
    raise _Precondition(400, f'Invalid value for {name}: {values[0]!r}') from None


def _conditions(request, prefix=''):
  """The four generation conditions of a request, as ints or None. `prefix`
  'Source' names those on a copy's source object."""
  def name(n):
    return f'if{prefix}{n}' if prefix else f'if{n}'
  return tuple(_int_query(request, name(n)) for n in (
      'GenerationMatch', 'GenerationNotMatch', 'MetagenerationMatch',
      'MetagenerationNotMatch'))


def _check_read(request, obj):
  """GCS's answer to a read (media or metadata) of `obj` (None: no live
  object) under the request's conditions, or None to serve it.

  A failed *Match is 412 and a held *NotMatch is 304 (Not Modified), as GCS
  answers a GET. A missing object is 404, except under a non-zero
  ifGenerationMatch, which GCS answers with 412 (tensorstore's gcs kvstore
  relies on it: "This is returned even when the object does not exist").
  A `generation` other than the live one is 404: the emulator keeps no
  older generations.
  """
  gen_match, gen_not_match, meta_match, meta_not_match = _conditions(request)
  if obj is None:
    if gen_match:
      return 412
    return 404
  generation = int(obj['generation'])
  metageneration = int(obj.get('metageneration') or 1)
  wanted = _int_query(request, 'generation')
  if wanted is not None and wanted != generation:
    return 404
  if gen_match is not None and gen_match != generation:
    return 412
  if meta_match is not None and meta_match != metageneration:
    return 412
  if gen_not_match is not None and gen_not_match == generation:
    return 304
  if meta_not_match is not None and meta_not_match == metageneration:
    return 304
  return None


def _check_write(conditions, obj):
  """412 if a write over `obj` (None: none live) fails `conditions` (the
  tuple of `_conditions`), else None. ifGenerationMatch=0: must not exist."""
  gen_match, gen_not_match, meta_match, meta_not_match = conditions
  generation = int(obj['generation']) if obj else None
  metageneration = int(obj.get('metageneration') or 1) if obj else None
  if gen_match is not None:
    if gen_match == 0:
      if obj is not None:
        return 412
    elif generation != gen_match:
      return 412
  if gen_not_match is not None and obj is not None and (
      generation == gen_not_match):
    return 412
  if meta_match is not None and metageneration != meta_match:
    return 412
  if meta_not_match is not None and obj is not None and (
      metageneration == meta_not_match):
    return 412
  return None


_REASONS = {304: 'notModified', 400: 'invalid', 404: 'notFound',
            412: 'conditionNotMet', 416: 'requestedRangeNotSatisfiable'}


def _precondition_failed(response, status):
  return _error(response, status, 'At least one of the pre-conditions you '
                'specified did not hold.')


def _error(response, status, message=''):
  from http import HTTPStatus  # pylint: disable=g-import-not-at-top
  response.status = HTTPStatus(status)
  if status in (204, 304):
    return
  message = message or HTTPStatus(status).phrase
  response.json({'error': {'code': status, 'message': message, 'errors': [
      {'domain': 'global', 'reason': _REASONS.get(status, 'error'),
       'message': message}]}})


def _live(storage, bucket, name):
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  try:
    return storage.get_file_obj(bucket, name)
  except NotFound:
    return None


_RANGE = re.compile(r'^\s*bytes=(\d*)-(\d*)\s*$')


def _read_target(request, response, storage):
  """(bucket, name, object) a read asks for; the object is None, and the
  error written to `response`, if it is missing or a precondition fails."""
  bucket = request.params['bucket_name']
  name = request.params['object_id']
  obj = _live(storage, bucket, name)
  status = _check_read(request, obj)
  if status:
    _error(response, status,
           f'No such object: {bucket}/{name}' if status == 404 else '')
    return bucket, name, None
  return bucket, name, obj


def _patch_emulator():
  """Patches gcp_storage_emulator in this process; returns its server
  module."""
  from http import HTTPStatus  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import server as srv  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top

  # Generations: strictly increasing, as GCS's are (time_ns can repeat).
  class _Clock:
    last = 0

    def time_ns(self):
      with _CLOCK_LOCK:
        _Clock.last = max(_Clock.last + 1, time.time_ns())
        return _Clock.last

    def __getattr__(self, name):
      return getattr(time, name)
  objects.time = _Clock()

  original = {f.__name__: f for f in (
      objects.download, objects.get, objects.ls, objects.insert,
      objects.upload_partial, objects.delete, objects.copy, objects.rewrite,
      objects.compose, objects.patch)}

  def download(request, response, storage, *args, **kwargs):
    del args, kwargs
    bucket, name, obj = _read_target(request, response, storage)
    if obj is None:
      return None
    data = storage.get_file(bucket, name)
    size = len(data)
    header = request.get_header('range', None)
    match = _RANGE.match(header) if header else None
    if match and (match.group(1) or match.group(2)):
      first, last = match.groups()
      if first:
        start = int(first)
        end = min(size, int(last) + 1) if last else size
      else:  # bytes=-N: the last N bytes.
        start, end = max(0, size - int(last)), size
      if size and (start >= size or end <= start):
        response['Content-Range'] = f'bytes */{size}'
        return _error(response, 416, 'The requested range cannot be '
                      'satisfied.')
      if size:
        data = data[start:end]
        response['Content-Range'] = f'bytes {start}-{end - 1}/{size}'
        response.status = HTTPStatus.PARTIAL_CONTENT
    else:
      response['X-Goog-Hash'] = f'crc32c={obj["crc32c"]},md5={obj["md5Hash"]}'
    response['x-goog-generation'] = str(obj['generation'])
    response['x-goog-metageneration'] = str(obj.get('metageneration') or 1)
    response['x-goog-stored-content-length'] = str(size)
    response['x-goog-stored-content-encoding'] = 'identity'
    response['x-goog-storage-class'] = obj.get('storageClass') or 'STANDARD'
    response['ETag'] = obj.get('etag') or ''
    if 'response-content-disposition' in request.query:
      response['Content-Disposition'] = request.query[
          'response-content-disposition'][0]
    for key, value in (obj.get('metadata') or {}).items():
      if value is not None:
        response[f'x-goog-meta-{key}'] = str(value)
    response.write_file(data, content_type=obj.get('contentType'))

  def get(request, response, storage, *args, **kwargs):
    if request.query.get('alt', [''])[0] == 'media':
      return download(request, response, storage)
    if request.query.get('softDeleted'):
      return original['get'](request, response, storage, *args, **kwargs)
    obj = _read_target(request, response, storage)[2]
    if obj is not None:
      response.json(obj)

  def ls(request, response, storage, *args, **kwargs):
    """objects.list with prefix, delimiter, matchGlob, startOffset,
    endOffset, includeTrailingDelimiter, maxResults and pageToken."""
    from gcp_storage_emulator.exceptions import BadRequest, NotFound  # pylint: disable=g-import-not-at-top
    q = {k: v[0] for k, v in request.query.items()}
    if q.get('softDeleted'):
      return original['ls'](request, response, storage, *args, **kwargs)
    prefix = q.get('prefix') or ''
    delimiter = q.get('delimiter') or None
    try:
      items, _ = storage.get_file_list(
          request.params['bucket_name'], prefix or None, None,
          q.get('matchGlob'))
    except NotFound:
      return _error(response, 404, 'The specified bucket does not exist.')
    except BadRequest as e:
      return _error(response, 400, str(e))
    start, end = q.get('startOffset'), q.get('endOffset')
    entries = {}
    for obj in items:
      name = obj['name']
      if (start and name < start) or (end and name >= end):
        continue
      rest = name[len(prefix):]
      if delimiter and delimiter in rest:
        head = prefix + rest.split(delimiter, 1)[0] + delimiter
        entries.setdefault(head, None)
        if (q.get('includeTrailingDelimiter') == 'true' and
            name == head):
          entries[name + '\0'] = obj
      else:
        entries[name] = obj
    names = sorted(entries)
    token = q.get('pageToken')
    if token:
      after = base64.urlsafe_b64decode(token.encode()).decode()
      names = [n for n in names if n > after]
    try:
      limit = max(1, min(int(q.get('maxResults') or 1000), 1000))
    except ValueError:
      return _error(response, 400, 'Invalid maxResults')
    page, more = names[:limit], len(names) > limit
    result = {'kind': 'storage#objects',
              'prefixes': [n for n in page if entries[n] is None],
              'items': [entries[n] for n in page if entries[n] is not None]}
    if more:
      result['nextPageToken'] = base64.urlsafe_b64encode(
          page[-1].encode()).decode()
    response.json(result)

  def _guard(handler, failed):
    """Wraps a writing handler: `failed(request, storage)`, the status of
    the request's conditions that do not hold (None when all do), is
    answered first."""
    def guarded(request, response, storage, *args, **kwargs):
      status = failed(request, storage)
      if status:
        return _precondition_failed(response, status)
      return handler(request, response, storage, *args, **kwargs)
    guarded.__name__ = handler.__name__
    return guarded

  def _write_guard(handler, target):
    """`_guard` of the request's conditions against the live object named
    by `target(request)`."""
    def failed(request, storage):
      bucket, name = target(request)
      if name is None:
        return None
      return _check_write(_conditions(request), _live(storage, bucket, name))
    return _guard(handler, failed)

  def insert_target(request):
    name = request.query.get('name', [None])[0]
    if name is None and request.query.get('uploadType', [''])[0] in (
        'multipart', 'resumable') and isinstance(request.data, dict):
      meta = request.data.get('meta', request.data)
      name = meta.get('name') if isinstance(meta, dict) else None
    return request.params['bucket_name'], name

  def insert(request, response, storage, *args, **kwargs):
    if (request.query.get('uploadType', [''])[0] == 'media' and
        request.data is None):
      request._data = b''  # pylint: disable=protected-access
    return original['insert'](request, response, storage, *args, **kwargs)

  def upload_target(request):
    upload = request.query.get('upload_id', [None])[0]
    obj = storage_of(request).resumable.get(upload) if upload else None
    if not obj:
      return None, None
    return obj['bucket'], obj['name']

  def storage_of(request):
    return request._request_handler.storage  # pylint: disable=protected-access

  def copy_failed(request, storage):
    """The source's conditions, then the destination's."""
    p = request.params
    return _check_write(
        _conditions(request, 'Source'),
        _live(storage, p['bucket_name'], p['object_id'])) or _check_write(
            _conditions(request),
            _live(storage, p['dest_bucket_name'], p['dest_object_id']))

  def delete_failed(request, storage):
    """A missing object is the handler's 404, whatever the conditions."""
    obj = _live(storage, *same(request))
    return None if obj is None else _check_write(_conditions(request), obj)

  def same(request):
    return request.params['bucket_name'], request.params['object_id']

  def move(request, response, storage, *args, **kwargs):
    """objects.move (POST .../o/SRC/moveTo/o/DST): an atomic rename within
    a bucket, which gcsfs tries first for every file it moves (the shipped
    emulator answers 501, which gcsfs retries 5 times, ~30 s, before it
    copies and deletes instead)."""
    del args, kwargs
    p = request.params
    bucket, src, dst = p['bucket_name'], p['object_id'], p['dest_object_id']
    source = _live(storage, bucket, src)
    wanted = _int_query(request, 'sourceGeneration')
    if source is None or (wanted is not None and
                          wanted != int(source['generation'])):
      return _error(response, 404, f'No such object: {bucket}/{src}')
    status = _check_write(_conditions(request, 'Source'), source) or (
        _check_write(_conditions(request), _live(storage, bucket, dst)))
    if status:
      return _precondition_failed(response, status)
    moved = objects._copy(request.base_url, storage, bucket, src, bucket, dst)  # pylint: disable=protected-access
    storage.delete_file(bucket, src)
    response.json(moved)

  replacements = {
      original['download']: download,
      original['get']: get,
      original['ls']: ls,
      original['insert']: _write_guard(insert, insert_target),
      original['upload_partial']: _write_guard(original['upload_partial'],
                                               upload_target),
      original['delete']: _guard(original['delete'], delete_failed),
      original['copy']: _guard(original['copy'], copy_failed),
      original['rewrite']: _guard(original['rewrite'], copy_failed),
      original['compose']: _write_guard(original['compose'], same),
      original['patch']: _write_guard(original['patch'], same),
  }
  objects.download = download
  objects.get = get
  move_routes = tuple(
      (rf'^{re.escape(base)}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)'
       r'/moveTo/o/(?P<dest_object_id>.*[^/]+)$', {'POST': _guarded(move)})
      for base in ('/storage/v1', ''))
  srv.HANDLERS = move_routes + tuple(
      (regex, {m: _guarded(replacements[f]) if f in replacements else f
               for m, f in handlers.items()})
      for regex, handlers in srv.HANDLERS)
  return srv


def _guarded(handler):
  """`handler`, with a malformed condition (a non-integer) answered 400."""
  def run(request, response, storage, *args, **kwargs):
    try:
      return handler(request, response, storage, *args, **kwargs)
    except _Precondition as e:
      return _error(response, e.status, e.message)
  run.__name__ = handler.__name__
  return run


_CLOCK_LOCK = threading.Lock()


def _read_body(rfile, headers):
  """The request body (chunked or Content-Length), or b''."""
  length = headers.get('Content-Length')
  if length:
    return rfile.read(int(length))
  if (headers.get('Transfer-Encoding') or '').lower() == 'chunked':
    out = bytearray()
    while True:
      line = rfile.readline(65537).strip().split(b';', 1)[0]
      size = int(line or b'0', 16)
      if size == 0:
        while rfile.readline(65537).strip():  # Trailers.
          pass
        return bytes(out)
      out += rfile.read(size)
      rfile.readline(65537)
  return b''


class _ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
  daemon_threads = True
  allow_reuse_address = True
  request_queue_size = 64


def make_emulator_server(port=0, shipped=False):
  """An HTTP server on 127.0.0.1:`port` (0: any free port) serving the
  patched emulator from memory (`shipped`: the emulator as released, as its
  own `start` command serves it); call serve_forever() (and shutdown())."""
  from gcp_storage_emulator.storage import Storage  # pylint: disable=g-import-not-at-top
  storage = Storage(use_memory_fs=True, data_dir=tempfile.gettempdir())
  if shipped:
    import functools  # pylint: disable=g-import-not-at-top
    from gcp_storage_emulator import server as shipped_server  # pylint: disable=g-import-not-at-top
    return http.server.HTTPServer(
        (HOST, port), functools.partial(shipped_server.RequestHandler, storage))
  srv = _patch_emulator()
  # In memory, the emulator would still serialise its whole index after
  # every write.
  storage._write_config_to_file = lambda: None  # pylint: disable=protected-access

  class Handler(srv.RequestHandler):
    """The emulator's handler: the body is read before the store is locked,
    and the answer written after."""

    def __init__(self, *args, **kwargs):
      super().__init__(storage, *args, **kwargs)

    def _serve(self, method):
      try:
        body = _read_body(self.rfile, self.headers)
      except (OSError, ValueError):
        self.close_connection = True
        return
      for key in ('Transfer-Encoding', 'Content-Length'):
        del self.headers[key]
      self.headers['Content-Length'] = str(len(body))
      socket_rfile, socket_wfile = self.rfile, self.wfile
      self.rfile, self.wfile = io.BytesIO(body), io.BytesIO()
      try:
        if self.path.startswith('/_emulator/'):
          self._internal(method)
        else:
          with _LOCK:
            srv.Router(self).handle(method)
      except Exception:  # pylint: disable=broad-exception-caught
        import traceback  # pylint: disable=g-import-not-at-top
        traceback.print_exc()
        self.wfile = io.BytesIO()
        self.send_response(500)
        self.send_header('Content-Length', '0')
        self.end_headers()
      finally:
        answer = self.wfile.getvalue()
        self.rfile, self.wfile = socket_rfile, socket_wfile
      # Headers were buffered by send_header into _headers_buffer and
      # flushed into the BytesIO by end_headers: all of it is in `answer`.
      with contextlib.suppress(OSError):
        self.wfile.write(answer)
        self.wfile.flush()

    def _internal(self, method):
      """/_emulator/b/NAME: DELETE drops a bucket and all it holds."""
      match = re.fullmatch(r'/_emulator/b/([-.\w]+)', self.path)
      if not match or method != 'DELETE':
        self.send_response(404)
        self.send_header('Content-Length', '0')
        self.end_headers()
        return
      bucket = match.group(1)
      with _LOCK:
        storage.buckets.pop(bucket, None)
        storage.objects.pop(bucket, None)
        storage.soft_deleted.pop(bucket, None)
        with contextlib.suppress(Exception):
          storage._store.remove_tree(bucket)  # pylint: disable=protected-access
      self.send_response(204)
      self.send_header('Content-Length', '0')
      self.end_headers()

    def do_GET(self):
      self._serve('GET')

    def do_POST(self):
      self._serve('POST')

    def do_PUT(self):
      self._serve('PUT')

    def do_DELETE(self):
      self._serve('DELETE')

    def do_PATCH(self):
      self._serve('PATCH')

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
      del format, args

  server = _ThreadingServer((HOST, port), Handler)
  server.storage = storage
  return server


def _watch_parent(parent_pid, deadline):
  """Ends this process when `parent_pid` is gone or at `deadline`."""
  while time.monotonic() < deadline:
    if os.getppid() != parent_pid:
      break
    try:
      os.kill(parent_pid, 0)
    except ProcessLookupError:
      break
    except PermissionError:
      pass
    time.sleep(0.2)
  os._exit(0)  # pylint: disable=protected-access


def serve(port=0, port_file=None, parent_pid=None, max_seconds=3 * 3600,
          proxy=False, shipped=False):
  """Runs the patched emulator (`shipped`: the emulator as released; with
  `proxy`, a FaultProxy in front of it) until the parent is gone or
  `max_seconds` have passed. The ports are written to `port_file`
  (atomically) and printed, as JSON: {"emulator": N, "proxy": M}."""
  server = make_emulator_server(port, shipped)
  threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.2},
                   daemon=True).start()
  emulator_port = server.server_address[1]
  ports = {'emulator': emulator_port}
  if proxy:
    front = FaultProxy(emulator_port).start()
    ports['proxy'] = front.port
  text = json.dumps(ports)
  if port_file:
    tmp = port_file + '.tmp'
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, port_file)
  print(text, flush=True)
  _watch_parent(parent_pid or os.getppid(), time.monotonic() + max_seconds)


class Emulator:
  """The patched emulator in a child process (`python tests/gcs.py serve`).

  The child exits by itself when this process is gone, after `max_seconds`,
  or at stop(). Use as a context manager, or start()/stop().
  """

  def __init__(self, max_seconds=3 * 3600, log_path=None, proxy=False,
               shipped=False):
    self.max_seconds = max_seconds
    self.log_path = log_path
    self.with_proxy = proxy
    self.shipped = shipped
    self.proc = None
    self.port = None
    self.proxy_port = None
    self._log = None

  @property
  def url(self):
    return f'http://{HOST}:{self.port}'

  def start(self, timeout=60):
    with tempfile.TemporaryDirectory(prefix='gcs_emulator_') as tmp:
      port_file = os.path.join(tmp, 'port')
      self._log = (open(self.log_path, 'ab') if self.log_path else  # pylint: disable=consider-using-with
                   tempfile.TemporaryFile())
      cmd = [sys.executable, os.path.abspath(__file__), 'serve',
             '--port-file', port_file, '--parent-pid', str(os.getpid()),
             '--max-seconds', str(self.max_seconds)]
      if self.with_proxy:
        cmd.append('--proxy')
      if self.shipped:
        cmd.append('--shipped')
      self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
          cmd, stdin=subprocess.DEVNULL, stdout=self._log,
          stderr=subprocess.STDOUT, close_fds=True)
      deadline = time.monotonic() + timeout
      while not os.path.exists(port_file):
        if self.proc.poll() is not None:
          raise RuntimeError(f'The GCS emulator exited ({self.proc.returncode}):'
                             f'\n{self.output()}')
        if time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f'The GCS emulator did not start in {timeout} s')
        time.sleep(0.05)
      with open(port_file) as f:
        ports = json.load(f)
    self.port = ports['emulator']
    self.proxy_port = ports.get('proxy')
    return self

  def output(self):
    """What the child printed (tracebacks of failed requests included)."""
    if self._log is None:
      return ''
    self._log.flush()
    self._log.seek(0)
    return self._log.read().decode(errors='replace')

  def stop(self):
    if self.proc is not None and self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(5)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait(5)
    if self._log is not None:
      self._log.close()
      self._log = None

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()

  # The JSON API, straight to the emulator (never through a proxy).

  def request(self, method, path, body=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        self.url + path, data=data, method=method,
        headers={'Content-Type': 'application/json'} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # pylint: disable=consider-using-with
      payload = r.read()
    return json.loads(payload) if payload else None

  def create_bucket(self, name=None):
    """A new empty bucket (soft delete off, so deletes free their data);
    returns its name."""
    name = name or f'test-{uuid.uuid4().hex[:16]}'
    self.request('POST', '/storage/v1/b?project=test', {
        'name': name, 'softDeletePolicy': {'retentionDurationSeconds': '0'}})
    return name

  def drop_bucket(self, name):
    """Removes a bucket and everything in it."""
    self.request('DELETE', f'/_emulator/b/{name}')

  def list_names(self, bucket, prefix=''):
    """Every object name in `bucket` under `prefix` (all pages)."""
    names, token = [], None
    while True:
      query = {'prefix': prefix}
      if token:
        query['pageToken'] = token
      page = self.request('GET', f'/storage/v1/b/{bucket}/o?'
                          + urllib.parse.urlencode(query))
      names += [o['name'] for o in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return names


# ---------------------------------------------------------------------------
# The fault-injecting proxy.

_HOP_BY_HOP = frozenset((
    'connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization',
    'te', 'trailers', 'transfer-encoding', 'upgrade', 'content-length'))

ACTIONS = ('status', 'reset', 'close', 'stall', 'truncate')


class Rule:
  """One fault: requests whose method fullmatches `method` and whose path
  (with its query string) matches `path` (re.search) get `action`:

  * 'status': answered with HTTP `status` (default 503) and a GCS-style JSON
    error, without reaching the emulator (`phase='before'`) or after it
    applied the request (`phase='after'`: the answer is lost, the write done).
  * 'reset': the connection is reset (RST), before or after forwarding.
  * 'close': the connection is closed (FIN) without an answer.
  * 'stall': `seconds` (at most 600) of silence, then the request goes on
    (before or after forwarding, per `phase`); one whose client left during
    a stall before forwarding (it timed out) is not forwarded.
  * 'truncate': the emulator's answer is cut after half its body, then the
    connection reset.

  The first `skip` matching requests pass; the next `count` get the fault
  (None: every one until the rule is removed).
  """

  _ids = itertools.count(1)

  def __init__(self, action='status', method='.*', path='.*', status=503,
               count=1, skip=0, seconds=0.0, phase='before', retry_after=None):
    if action not in ACTIONS:
      raise ValueError(f'action must be one of {ACTIONS}, not {action!r}')
    if phase not in ('before', 'after'):
      raise ValueError(f"phase must be 'before' or 'after', not {phase!r}")
    if not 0 <= float(seconds) <= 600:
      raise ValueError(f'seconds must be in [0, 600], not {seconds!r}')
    self.id = next(self._ids)
    self.action = action
    self.method = method
    self.path = path
    self._method = re.compile(method)
    self._path = re.compile(path)
    self.status = status
    self.count = count
    self.skip = skip
    self.seconds = float(seconds)
    self.phase = phase
    self.retry_after = retry_after
    self.matched = 0
    self.injected = 0

  def to_json(self):
    return {k: getattr(self, k) for k in (
        'id', 'action', 'method', 'path', 'status', 'count', 'skip', 'seconds',
        'phase', 'retry_after', 'matched', 'injected')}

  @property
  def spent(self):
    return self.count is not None and self.injected >= self.count

  def _take(self, method, path):
    """Whether this request gets the fault (under the proxy's lock)."""
    if self.spent or not self._method.fullmatch(method) or (
        not self._path.search(path)):
      return False
    self.matched += 1
    if self.matched <= self.skip:
      return False
    self.injected += 1
    return True


class FaultProxy:
  """A reverse proxy on 127.0.0.1 in front of the emulator at
  `upstream_port`, on threads of this process; see `Rule` for the faults.

  `requests` records every request (see there); `faults` those that got
  one. Start with start() or as a context manager; stop() ends the stalls in
  progress too.
  """

  def __init__(self, upstream_port, port=0, upstream_timeout=120,
               max_records=100_000):
    self.upstream_port = upstream_port
    self.upstream_timeout = upstream_timeout
    self._lock = threading.Lock()
    self._rules = []
    self._records = collections.deque(maxlen=max_records)
    self._stop = threading.Event()
    self._server = _ProxyServer((HOST, port), _ProxyHandler)
    self._server.proxy = self
    self._thread = None

  @property
  def port(self):
    return self._server.server_address[1]

  @property
  def url(self):
    return f'http://{HOST}:{self.port}'

  def start(self):
    self._thread = threading.Thread(
        target=self._server.serve_forever, kwargs={'poll_interval': 0.2},
        name='gcs-fault-proxy', daemon=True)
    self._thread.start()
    return self

  def stop(self):
    self._stop.set()
    self._server.shutdown()
    self._server.server_close()
    if self._thread is not None:
      self._thread.join(5)

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()

  # Rules.

  def add(self, action='status', **kwargs):
    """Adds a Rule(action, **kwargs) and returns it."""
    rule = Rule(action, **kwargs)
    with self._lock:
      self._rules.append(rule)
    return rule

  def fail(self, count=1, status=503, **kwargs):
    """The next `count` matching requests get HTTP `status`."""
    return self.add('status', status=status, count=count, **kwargs)

  def remove(self, rule):
    with self._lock:
      if rule in self._rules:
        self._rules.remove(rule)

  def clear(self):
    """Removes every rule (faults in progress finish)."""
    with self._lock:
      self._rules.clear()

  def reset(self):
    """Removes every rule and forgets every record."""
    with self._lock:
      self._rules.clear()
      self._records.clear()

  @property
  def rules(self):
    with self._lock:
      return list(self._rules)

  # Records.

  @property
  def requests(self):
    """Snapshots of the records, oldest first. A record is added when the
    request has been read, before any answer: `status` is the status sent
    (None: none, the connection was dropped or the client went away),
    `upstream` the emulator's (None: not forwarded), `done` whether the
    proxy has finished with it."""
    with self._lock:
      return [dict(r) for r in self._records]

  @property
  def faults(self):
    return [r for r in self.requests if r['fault']]

  def count(self, method='.*', path='.*', fault=None):
    """How many recorded requests match (and, if given, got `fault`)."""
    m, p = re.compile(method), re.compile(path)
    return sum(1 for r in self.requests
               if m.fullmatch(r['method']) and p.search(r['path'])
               and (fault is None or r['fault'] == fault))

  def _choose(self, method, path):
    with self._lock:
      for rule in self._rules:
        if rule._take(method, path):  # pylint: disable=protected-access
          return rule
    return None

  def _record(self, record):
    with self._lock:
      self._records.append(record)


class _ProxyServer(_ThreadingServer):
  """Closes a connection marked for reset with an RST, not a FIN."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._resets = set()
    self._resets_lock = threading.Lock()

  def mark_reset(self, request):
    request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                       struct.pack('ii', 1, 0))
    with self._resets_lock:
      self._resets.add(id(request))

  def shutdown_request(self, request):
    with self._resets_lock:
      reset = id(request) in self._resets
      self._resets.discard(id(request))
    if reset:
      self.close_request(request)  # SO_LINGER 0: close sends RST.
    else:
      super().shutdown_request(request)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
  """One request: read it whole, maybe inject a fault, else forward."""

  protocol_version = 'HTTP/1.0'
  server_version = 'gcs-fault-proxy'

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    del format, args

  def _handle(self):
    proxy = self.server.proxy
    started = time.monotonic()
    try:
      body = _read_body(self.rfile, self.headers)
    except (OSError, ValueError):
      self.close_connection = True
      return
    if self.path.startswith('/_proxy/'):
      self._record = {}
      return self._control(proxy, body)
    rule = proxy._choose(self.command, self.path)  # pylint: disable=protected-access
    # Recorded before anything is answered: a client may act on the answer
    # (and a test look at the records) before this thread goes on.
    self._record = record = {
        't': time.time(), 'method': self.command, 'path': self.path,
        'status': None, 'upstream': None,
        'fault': rule.action if rule else None, 'rule': rule.id if rule else None,
        'error': None, 'seconds': None, 'done': False,
        'authorized': 'Authorization' in self.headers,
        'agent': self.headers.get('User-Agent', '')}
    proxy._record(record)  # pylint: disable=protected-access
    try:
      self._answer(proxy, rule, body)
    except OSError as e:  # The client went away (gcsfs cancels requests).
      record['error'] = f'{type(e).__name__}: {e}'
      self.close_connection = True
      self.wfile = io.BytesIO()
    finally:
      record['seconds'] = round(time.monotonic() - started, 4)
      record['done'] = True

  def _answer(self, proxy, rule, body):
    """Serves the request under `rule` (None: forward)."""
    before = rule is not None and rule.phase == 'before'
    if before and rule.action == 'stall':
      if proxy._stop.wait(rule.seconds):  # pylint: disable=protected-access
        return self._drop(reset=True)
      if self._client_gone():  # It timed out: nothing reaches the emulator.
        self._record['error'] = 'the client left during the stall'
        return self._drop(reset=False)
    elif before and rule.action == 'status':
      return self._send_error(rule)
    elif before and rule.action in ('reset', 'close'):
      return self._drop(reset=rule.action == 'reset')
    try:
      status, headers, payload = self._forward(proxy, body)
    except (OSError, http.client.HTTPException) as e:
      return self._send_plain(502, f'Upstream failed: {e}')
    self._record['upstream'] = status
    if rule is not None and not before:
      if rule.action == 'stall':
        if proxy._stop.wait(rule.seconds):  # pylint: disable=protected-access
          return self._drop(reset=True)
      elif rule.action == 'status':
        return self._send_error(rule)
      elif rule.action in ('reset', 'close'):
        return self._drop(reset=rule.action == 'reset')
    if rule is not None and rule.action == 'truncate':
      self._send(status, headers, payload[:len(payload) // 2],
                 length=len(payload))
      self.wfile.flush()
      return self._drop(reset=True)
    return self._send(status, headers, payload)

  def _client_gone(self):
    """Whether the client closed or reset its connection (its request was
    read whole, so anything readable now is the end of the stream)."""
    try:
      readable, _, _ = select.select([self.connection], [], [], 0)
      return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
    except OSError:
      return True

  def _forward(self, proxy, body):
    conn = http.client.HTTPConnection(HOST, proxy.upstream_port,
                                      timeout=proxy.upstream_timeout)
    try:
      headers = {k: v for k, v in self.headers.items()
                 if k.lower() not in _HOP_BY_HOP}
      if body or self.command in ('POST', 'PUT', 'PATCH'):
        headers['Content-Length'] = str(len(body))
      conn.request(self.command, self.path, body=body or None,
                   headers=headers)
      response = conn.getresponse()
      payload = response.read()
      return response.status, response.getheaders(), payload
    finally:
      conn.close()

  def _send(self, status, headers, payload, length=None):
    self._record['status'] = status
    self.send_response_only(status)
    for key, value in headers:
      if key.lower() not in _HOP_BY_HOP:
        self.send_header(key, value)
    self.send_header('Content-Length', str(
        len(payload) if length is None else length))
    self.send_header('Connection', 'close')
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(payload)
    self.close_connection = True

  def _send_plain(self, status, message, extra=()):
    payload = json.dumps({'error': {'code': status, 'message': message,
                                    'errors': [{'message': message}]}}).encode()
    self._send(status, [('Content-Type', 'application/json'), *extra],
               payload)
    return status

  def _send_error(self, rule):
    extra = ()
    if rule.retry_after is not None:
      extra = (('Retry-After', str(rule.retry_after)),)
    return self._send_plain(rule.status, f'Injected fault (rule {rule.id})',
                            extra)

  def _drop(self, reset):
    self.close_connection = True
    if reset:
      self.server.mark_reset(self.connection)
    else:
      with contextlib.suppress(OSError):
        self.connection.shutdown(socket.SHUT_WR)
    # Nothing more may be written: the handler's wfile is swapped out.
    self.wfile = io.BytesIO()
    return None

  def _control(self, proxy, body):
    """GET /_proxy/requests, GET|POST|DELETE /_proxy/rules (POST takes a
    Rule's keywords as a JSON object, or a list of them)."""
    path = self.path.split('?', 1)[0]
    if path == '/_proxy/requests' and self.command == 'GET':
      return self._send_json(proxy.requests)
    if path == '/_proxy/rules':
      if self.command == 'GET':
        return self._send_json([r.to_json() for r in proxy.rules])
      if self.command == 'DELETE':
        proxy.reset() if 'forget' in self.path else proxy.clear()  # pylint: disable=expression-not-assigned
        return self._send_json([])
      if self.command == 'POST':
        try:
          specs = json.loads(body or b'{}')
          specs = specs if isinstance(specs, list) else [specs]
          rules = [proxy.add(**spec) for spec in specs]
        except (ValueError, TypeError) as e:
          return self._send_plain(400, str(e))
        return self._send_json([r.to_json() for r in rules])
    return self._send_plain(404, f'No such control path: {self.path}')

  def _send_json(self, value):
    self._send(200, [('Content-Type', 'application/json')],
               json.dumps(value).encode())

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle


# ---------------------------------------------------------------------------
# pytest fixtures. Shared with other test files by importing them into
# tests/conftest.py (`from tests.gcs import gcs_server, gcs_bucket, gcs_env`).


class GcsServer:
  """The session's emulator and the proxy in front of it. `url` (the
  proxy's) is what clients are pointed at; `emulator.url` bypasses faults."""

  def __init__(self, emulator, proxy):
    self.emulator = emulator
    self.proxy = proxy

  @property
  def url(self):
    return self.proxy.url

  def env(self):
    """os.environ with client_env(url): the environment of a subprocess
    (python -m multistep_cm.main ...) that is to use the emulator."""
    env = dict(os.environ)
    env.pop('GOOGLE_APPLICATION_CREDENTIALS', None)
    env.update(client_env(self.url))
    return env


class GcsBucket:
  """A fresh bucket of the session's emulator, for one test."""

  def __init__(self, server, name):
    self.server = server
    self.name = name

  @property
  def root(self):
    return f'gs://{self.name}'

  def path(self, *parts):
    return '/'.join((self.root,) + parts)

  def upload(self, local, *parts, keep=lambda rel: True):
    """Every file under the local directory `local` (those whose relative
    path `keep` accepts) to the same place under path(*parts), as
    `gcloud storage cp -r` copies a directory; returns that gs:// path."""
    from etils import epath  # pylint: disable=g-import-not-at-top
    url = self.path(*parts)
    for parent, _, files in os.walk(local):
      for f in files:
        rel = os.path.relpath(os.path.join(parent, f), local)
        if keep(rel):
          with open(os.path.join(parent, f), 'rb') as data:
            (epath.Path(url) / rel).write_bytes(data.read())
    return url

  @property
  def proxy(self):
    return self.server.proxy

  @property
  def emulator(self):
    return self.server.emulator

  def names(self, prefix=''):
    """The object names under `prefix`, asked of the emulator directly."""
    return self.server.emulator.list_names(self.name, prefix)

  def env(self):
    return self.server.env()


if pytest is not None:

  @pytest.fixture(scope='session')
  def gcs_server():
    """The emulator (a child process that ends with this one) and a
    FaultProxy in front of it, on free 127.0.0.1 ports, for the session (one
    per xdist worker)."""
    with Emulator() as emulator, FaultProxy(emulator.port) as proxy:
      yield GcsServer(emulator, proxy)

  @pytest.fixture
  def gcs_bucket(gcs_server, monkeypatch):  # pylint: disable=redefined-outer-name
    """A fresh empty bucket; this process's GCS clients pointed at the
    proxy (apply_in_process); the proxy without rules or records. The bucket
    and all it holds are dropped afterwards."""
    gcs_server.proxy.reset()
    name = gcs_server.emulator.create_bucket()
    apply_in_process(monkeypatch, gcs_server.url)
    try:
      yield GcsBucket(gcs_server, name)
    finally:
      gcs_server.proxy.reset()
      clear_client_caches()
      gcs_server.emulator.drop_bucket(name)

  @pytest.fixture
  def gcs_env(gcs_server):  # pylint: disable=redefined-outer-name
    """The environment (a dict) for a subprocess that is to use the
    emulator through the proxy."""
    return gcs_server.env()


# ---------------------------------------------------------------------------


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  s = sub.add_parser('serve', help='run the patched emulator on 127.0.0.1')
  s.add_argument('--port', type=int, default=0, help='0: any free port')
  s.add_argument('--port-file', help='where to write {"emulator": PORT, ...}')
  s.add_argument('--parent-pid', type=int,
                 help='exit when this process is gone (default: the parent)')
  s.add_argument('--max-seconds', type=float, default=3 * 3600,
                 help='exit after this long whatever happens')
  s.add_argument('--proxy', action='store_true',
                 help='also run a FaultProxy in front, rules set over HTTP')
  s.add_argument('--shipped', action='store_true',
                 help='the emulator as released, without the patches')
  args = parser.parse_args(argv)
  if args.command == 'serve':
    serve(args.port, args.port_file, args.parent_pid, args.max_seconds,
          args.proxy, args.shipped)


if __name__ == '__main__':
  main()
