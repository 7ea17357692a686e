"""Files on gs:// without TensorFlow: etils' epath reaches them through
fsspec's gcsfs (orbax's arrays go through tensorstore's own GCS client,
array_record's through google-cloud-cpp's). `configure()`, which main calls
before anything touches a file, changes two of gcsfs's defaults that do not
suit a long job; a setting the user made wins.
"""

import os

# gcsfs's newer file system asks the Storage Control API, over gRPC, for each
# bucket's layout before using it, and does not remember a failed answer: it
# warns and waits for each file (up to 30 s with credentials and no gRPC
# route). The classic JSON-API file system serves flat and hierarchical
# buckets alike. Read once, when gcsfs is imported.
_GRPC_PROBE = 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'
# A request that stalls (a connection accepted, then silence) waits forever
# by default. Past these, aiohttp raises a time-out that gcsfs retries as it
# retries a 503; a large read is not limited, only a silent one.
CONNECT_TIMEOUT_S = 60
READ_TIMEOUT_S = 120


def configure():
  os.environ.setdefault(_GRPC_PROBE, 'false')
  try:
    # pylint: disable=g-import-not-at-top
    import aiohttp
    import fsspec.config
  except ImportError:
    return  # No gcsfs: gs:// fails in one line where it is used.
  fsspec.config.conf.setdefault('gcs', {}).setdefault(
      'requests_timeout', aiohttp.ClientTimeout(
          sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S))
