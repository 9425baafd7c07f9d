"""Where a run's files live: a local directory or object storage (`gs://`,
and any other URL scheme fsspec has a file system for, e.g. `s3://`).

Every file a run, an evaluation, a sweep, a report or a data cache reads or
writes goes through these functions, which take paths as strings: local
paths use the operating system directly, URLs go through fsspec (gcsfs for
`gs://`), the same file systems Orbax reaches through `etils.epath`.

What object storage lacks is made up for here:
  - no rename: a file is replaced by one upload, which object stores make
    visible all at once (`write_bytes`), where a local file is written beside
    its target and renamed over it;
  - no append: `Appender` keeps what it wrote and uploads the whole object
    again when flushed;
  - no exclusive create in the file API: `create_exclusive` asks GCS for
    generation 0 (`ifGenerationMatch=0`), locally it links a finished file
    into place; either fails when the name exists, which is what the run
    directory's lease (hiertx.lease) is built on.

Listings are never cached (`use_listings_cache=False`): another process may
have written a file a moment ago, and that is what the lease and the sweeps
look for.
"""

import base64
import os
import posixpath
import shutil
import uuid

from hiertx.errors import HiertxError


class StorageError(HiertxError):
  """A path cannot be used: an unknown scheme, or its file system is missing."""


# Installable file systems for the schemes users write, for the error message.
_PACKAGES = {"gs": "gcsfs (pip install 'hiertx[gcs]')", "gcs": "gcsfs (pip install 'hiertx[gcs]')",
             "s3": "s3fs (pip install s3fs)", "az": "adlfs (pip install adlfs)",
             "abfs": "adlfs (pip install adlfs)"}


def is_url(path: str) -> bool:
  return "://" in str(path)


def scheme(path: str) -> str:
  return str(path).split("://", 1)[0] if is_url(path) else ""


def check(path: str, what: str = "path") -> str:
  """`path` when it can be opened (a local path, or a URL whose file system is
  installed); otherwise one StorageError naming `what` (e.g. '--workdir')."""
  if not path:
    raise StorageError(f"{what}: must not be empty")
  path = str(path)
  if not is_url(path):
    return path
  name = scheme(path)
  if name == "file":
    return path[len("file://"):]
  try:
    _fs(path)
  except (ImportError, ValueError) as e:
    need = _PACKAGES.get(name)
    hint = f"needs {need}" if need else f"no file system for '{name}://' ({e})"
    raise StorageError(f"{what}={path!r}: {hint}") from None
  if not _strip(path).strip("/"):
    raise StorageError(f"{what}={path!r}: needs a bucket (and a path in it)")
  return path.rstrip("/")


_FILESYSTEMS: dict = {}


def _fs(path: str):
  """The fsspec file system of a URL: one per scheme and endpoint (gcsfs
  reads an emulator's address, STORAGE_EMULATOR_HOST, when it is made)."""
  import fsspec  # only URLs need it

  key = (scheme(path), os.environ.get("STORAGE_EMULATOR_HOST"))
  if key not in _FILESYSTEMS:
    _FILESYSTEMS[key] = fsspec.filesystem(key[0], use_listings_cache=False,
                                          skip_instance_cache=True)
  return _FILESYSTEMS[key]


def _strip(url: str) -> str:
  return url.split("://", 1)[1]


def join(base: str, *parts: str) -> str:
  if is_url(base):
    return posixpath.join(base.rstrip("/"), *parts)
  return os.path.join(base, *parts)


def name(path: str) -> str:
  """The last component of a path."""
  return posixpath.basename(str(path).rstrip("/")) if is_url(path) else os.path.basename(
      str(path).rstrip(os.sep))


def absolute(path: str) -> str:
  """Local paths made absolute (so a job started elsewhere finds them); URLs as given."""
  return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


# ----------------------------------------------------------------------------
# Queries.


def exists(path: str) -> bool:
  return _fs(path).exists(_strip(path)) if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _fs(path).isdir(_strip(path)) if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _fs(path).isfile(_strip(path)) if is_url(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """Names in a directory ([] when it does not exist)."""
  if not is_url(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  try:
    entries = _fs(path).ls(_strip(path), detail=False)
  except FileNotFoundError:
    return []
  prefix = _strip(path).rstrip("/") + "/"
  return sorted({e.rstrip("/")[len(prefix):] for e in entries
                 if e.rstrip("/").startswith(prefix)} - {""})


def glob(pattern: str) -> list[str]:
  """Paths matching a glob (`**` matches any depth)."""
  if not is_url(pattern):
    import glob as glob_lib

    return sorted(glob_lib.glob(pattern, recursive=True))
  prefix = scheme(pattern) + "://"
  return sorted(prefix + p for p in _fs(pattern).glob(_strip(pattern)))


def stamp(path: str) -> str:
  """Changes whenever the file is rewritten (mtime locally, generation on GCS)."""
  if not is_url(path):
    return str(os.path.getmtime(path))
  info = _fs(path).info(_strip(path))
  return str(info.get("generation") or info.get("mtime") or info.get("LastModified") or "")


# ----------------------------------------------------------------------------
# Reading and writing whole files.


def read_bytes(path: str) -> bytes:
  if is_url(path):
    return _fs(path).cat_file(_strip(path))
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode()


def makedirs(path: str) -> None:
  """Creates a directory and its parents (object stores have no directories:
  nothing to do there)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def write_bytes(path: str, data: bytes) -> None:
  """Replaces `path` with `data` at once: a reader sees the old or the new
  contents, never part of them (an upload is one object version; a local
  file is written beside its target, then renamed over it)."""
  if is_url(path):
    _fs(path).pipe_file(_strip(path), data)
    return
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def create_exclusive(path: str, data: bytes) -> bool:
  """Writes `path` only if no file has that name; False when one has. Of
  several processes creating the same name at once, exactly one succeeds."""
  if is_url(path):
    if scheme(path) not in ("gs", "gcs"):
      raise StorageError(f"{path}: creating a file exclusively is implemented for gs:// "
                         "and local paths")
    try:
      _fs(path).pipe_file(_strip(path), data, mode="create")  # ifGenerationMatch=0
    except FileExistsError:
      return False
    return True
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  with open(tmp, "wb") as f:
    f.write(data)
  try:
    os.link(tmp, path)  # atomic, also on NFS; the file is complete when it appears
  except FileExistsError:
    return False
  finally:
    os.remove(tmp)
  return True


def remove(path: str) -> None:
  """Deletes a file; a missing one is not an error."""
  try:
    if is_url(path):
      _fs(path).rm_file(_strip(path))
    else:
      os.remove(path)
  except FileNotFoundError:
    pass


def rmtree(path: str) -> None:
  if is_url(path):
    if exists(path):
      _fs(path).rm(_strip(path), recursive=True)
    return
  shutil.rmtree(path, ignore_errors=True)


def rename(src: str, dst: str) -> None:
  """Moves a file or a directory (on object storage: copies, then deletes)."""
  if is_url(src):
    _fs(src).mv(_strip(src), _strip(dst), recursive=True)
  else:
    os.rename(src, dst)


def upload_tree(local_dir: str, dst: str, last: tuple[str, ...] = ()) -> None:
  """Copies a local directory's files to `dst` (a URL or a local directory),
  the names in `last` after every other file: readers that wait for those
  names (a manifest, a meta.json) never see a partial copy."""
  files = []
  for root, _, names in os.walk(local_dir):
    for n in names:
      files.append(os.path.relpath(os.path.join(root, n), local_dir))
  files.sort(key=lambda rel: (rel in last, rel))
  for rel in files:
    target = join(dst, *rel.split(os.sep))
    if is_url(dst):
      _fs(dst).put_file(os.path.join(local_dir, rel), _strip(target))
    else:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.copyfile(os.path.join(local_dir, rel), target)


# ----------------------------------------------------------------------------
# Files written a piece at a time.


class Appender:
  """A file written a piece at a time (metrics lines, TensorBoard records).

  Locally the pieces are appended as they come. On object storage, which
  cannot append, the object is rewritten whole on `flush()` with everything
  written so far, its earlier contents included (`keep_existing`); the
  caller decides how often (hiertx.metrics flushes at evaluations,
  checkpoints and the end of a run)."""

  def __init__(self, path: str, keep_existing: bool = True):
    self.path = path
    self.remote = is_url(path)
    if self.remote:
      self._data = bytearray()
      if keep_existing and exists(path):
        self._data += read_bytes(path)
      self._dirty = False
    else:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self._file = open(path, "ab" if keep_existing else "wb")

  def write(self, data: bytes | str) -> None:
    data = data.encode() if isinstance(data, str) else data
    if self.remote:
      self._data += data
      self._dirty = True
    else:
      self._file.write(data)

  def flush(self) -> None:
    if self.remote:
      if self._dirty:
        write_bytes(self.path, bytes(self._data))
        self._dirty = False
    else:
      self._file.flush()

  def close(self) -> None:
    self.flush()
    if not self.remote:
      self._file.close()


# ----------------------------------------------------------------------------
# Sizes and checksums of a directory's files.


def _crc32c_local(path: str) -> str:
  import google_crc32c

  crc = google_crc32c.Checksum()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      crc.update(block)
  return crc.hexdigest().decode()


def _crc32c_of_object(info: dict) -> str | None:
  """GCS keeps each object's CRC32C (base64 of 4 bytes) in its metadata."""
  value = info.get("crc32c")
  return base64.b64decode(value).hex() if value else None


def file_checksums(root: str, checksums: bool = True) -> dict[str, dict]:
  """{relative path: {'size': bytes, 'crc32c': hex}} of every file under
  `root`. On GCS the CRC32C comes from the objects' metadata (nothing is
  downloaded); locally it is computed, unless `checksums` is False (sizes
  only, 'crc32c' None)."""
  out = {}
  if is_url(root):
    fs, base = _fs(root), _strip(root).rstrip("/")
    for key, info in fs.find(base, detail=True).items():
      if info.get("type") == "directory":
        continue
      out[key[len(base) + 1:]] = {"size": int(info["size"]), "crc32c": _crc32c_of_object(info)}
    return out
  for dirpath, _, names in os.walk(root):
    for n in names:
      path = os.path.join(dirpath, n)
      rel = os.path.relpath(path, root).replace(os.sep, "/")
      out[rel] = {"size": os.path.getsize(path),
                  "crc32c": _crc32c_local(path) if checksums else None}
  return out
