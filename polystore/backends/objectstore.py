"""The ``objectstore`` backend: whole files at ``s3://bucket/key`` or any fsspec URL.

Each file is one object written by a single request (``pipe``): S3 makes an object visible
only when its upload completes, so a failed write leaves no partial object. Arrays and
text are encoded by extension through the same formats as the disk backend
(`polystore.formats`). The backend declares the byte-level
capability (``can_hold_bytes``): copies between such backends move the stored bytes.
Credentials come from the standard environment and config files (for S3: the
``AWS_*`` variables, ``~/.aws``) or ``storage_options``.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from polystore import formats
from polystore.base import StorageBackend
from polystore.paths import name_matches, normalize_extensions

__all__ = ["ObjectStoreBackend"]

logger = logging.getLogger(__name__)

INSTALL_S3 = "pip install 'polystore[s3]' (fsspec, s3fs)"


class ObjectStoreBackend(StorageBackend):
    """Files as objects in an object store (S3, GCS, Azure, ... through fsspec).

    Paths are URLs (``s3://bucket/run1/A01.tif``), or relative to ``base_url``.
    ``storage_options`` go to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``
    for an S3-compatible server); the filesystem is created once per backend, so the
    credentials it uses are those in force when the backend first touches the store.
    ``timeout`` (seconds, None = none) bounds every call on an async store such as S3: a
    line that drops while an upload waits for the server's "100 Continue" would otherwise
    hang in aiohttp.
    """

    _backend_type = "objectstore"
    can_list: ClassVar[bool] = True
    can_hold_bytes: ClassVar[bool] = True

    def __init__(self, base_url: str | None = None, *,
                 storage_options: dict[str, Any] | None = None,
                 timeout: float | None = 300.0) -> None:
        self.base_url = None if base_url is None else base_url.rstrip("/")
        self.timeout = timeout
        self.storage_options = dict(storage_options or {})
        self._filesystems: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # -- paths ------------------------------------------------------------------------
    def url(self, path: Any) -> str:
        text = str(path)
        if "://" in text:
            return text
        if self.base_url is None:
            raise ValueError(f"objectstore paths are URLs such as 's3://bucket/key', got "
                             f"{text!r}; or create ObjectStoreBackend(base_url='s3://bucket')")
        if ".." in text.split("/"):
            raise ValueError(f"objectstore path {text!r}: '..' is not allowed")
        return f"{self.base_url}/{text.lstrip('/')}"

    def _fs(self, url: str) -> tuple[Any, str]:
        try:
            import fsspec
        except ImportError as exc:  # pragma: no cover - the s3 extra installs it
            raise ImportError(f"the objectstore backend needs fsspec: {INSTALL_S3}") from exc
        protocol = url.split("://", 1)[0]
        fs = self._filesystems.get(protocol)
        if fs is None:
            try:
                fs = fsspec.filesystem(protocol, skip_instance_cache=True,
                                       **self.storage_options)
            except ImportError as exc:
                raise ImportError(f"cannot open {url!r}: {exc}. {INSTALL_S3}") from None
            self._filesystems[protocol] = fs
        return fs, fs._strip_protocol(url)

    @contextmanager
    def _at(self, path: Any, writing: bool = False) -> Iterator[tuple[Any, str, str]]:
        """(filesystem, key, url) for ``path``; store failures inside become clear errors."""
        url = self.url(path)
        fs, key = self._fs(url)
        with _clear_errors(url, writing):
            yield fs, key, url

    def _limits(self, fs: Any) -> dict[str, Any]:
        """The per-call timeout, for filesystems whose calls take one (async ones)."""
        return {"timeout": self.timeout} if getattr(fs, "async_impl", False) else {}

    # -- bytes ------------------------------------------------------------------------
    def write_bytes(self, data: bytes, path: Any, **kwargs: Any) -> None:
        """Store ``data`` as one object, in a single request (all or nothing)."""
        if not isinstance(data, formats.BYTES_TYPES):
            raise TypeError(f"write_bytes takes bytes, not {type(data).__name__}")
        with self._at(path, writing=True) as (fs, key, url):
            fs.pipe_file(key, bytes(data), **self._limits(fs), **kwargs)
            fs.invalidate_cache(key)

    def read_bytes(self, path: Any, **kwargs: Any) -> bytes:
        with self._at(path) as (fs, key, url):
            return fs.cat_file(key, **self._limits(fs), **kwargs)

    # -- arrays and text --------------------------------------------------------------
    def save(self, data: Any, file_path: Any, **kwargs: Any) -> None:
        """Encode ``data`` by the path's extension (bytes are stored as they are)."""
        if isinstance(data, formats.BYTES_TYPES):
            self.write_bytes(bytes(data), file_path)
            return
        # the same formats table as disk and memory (polystore.formats)
        self.write_bytes(formats.encode(data, str(file_path), "objectstore", **kwargs), file_path)

    def load(self, file_path: Any, **kwargs: Any) -> Any:
        """Decode by extension; other extensions (or ``raw=True``) give the bytes."""
        raw = kwargs.pop("raw", False)
        payload = self.read_bytes(file_path)
        if raw:
            return payload
        return formats.decode(payload, str(file_path), **kwargs)

    # -- navigation -------------------------------------------------------------------
    def exists(self, path: Any) -> bool:
        with self._at(path) as (fs, key, url):
            return bool(fs.exists(key, **self._limits(fs)))

    def is_file(self, path: Any) -> bool:
        """An object at exactly this key, whether or not other objects lie under it as a
        prefix (a listing cached by `list_dir` shows such a key as a directory)."""
        with self._at(path) as (fs, key, url):
            fs.invalidate_cache(key)
            return bool(fs.isfile(key, **self._limits(fs)))

    def is_dir(self, path: Any) -> bool:
        with self._at(path) as (fs, key, url):
            fs.invalidate_cache(key)  # see is_file
            return bool(fs.isdir(key, **self._limits(fs)))

    def list_dir(self, path: Any) -> list[str]:
        with self._at(path) as (fs, key, url):
            if not fs.isdir(key, **self._limits(fs)):
                raise FileNotFoundError(f"no folder {url!r} in the object store")
            return sorted({entry.rstrip("/").rsplit("/", 1)[-1]  # an object and a prefix:
                           for entry in fs.ls(key, detail=False, refresh=True,  # one name
                                                **self._limits(fs))})

    def list_files(
        self,
        directory: Any,
        pattern: str | None = None,
        extensions: Iterable[str] | None = None,
        recursive: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """Object paths under ``directory``, spelled like it."""
        exts = normalize_extensions(extensions)
        with self._at(directory) as (fs, key, url):
            if not fs.isdir(key, **self._limits(fs)):
                raise FileNotFoundError(f"no folder {url!r} in the object store")
            found = fs.find(key, maxdepth=None if recursive else 1, withdirs=False,
                            **self._limits(fs))
        prefix, base = key.rstrip("/"), str(directory).rstrip("/")
        names = [f[len(prefix) + 1:] for f in found if f.startswith(prefix + "/")]
        return sorted(f"{base}/{n}" for n in names
                      if name_matches(n.rsplit("/", 1)[-1], pattern, exts))

    def delete(self, path: Any, recursive: bool = False) -> None:
        found, holds_objects = True, False
        with self._at(path, writing=True) as (fs, key, url):
            fs.invalidate_cache(key)
            if fs.isfile(key, **self._limits(fs)):
                fs.rm_file(key, **self._limits(fs))
            elif fs.isdir(key, **self._limits(fs)):
                if recursive:
                    fs.rm(key, recursive=True, **self._limits(fs))
                else:
                    holds_objects = True
            else:
                found = False
            fs.invalidate_cache(key)
        # said outside: inside, they would read as a missing bucket or a lost connection
        if holds_objects:
            raise OSError(errno.ENOTEMPTY, f"{url!r} holds objects: delete(path, "
                          "recursive=True) removes them all; nothing was deleted")
        if not found:
            raise FileNotFoundError(f"nothing at {url!r} on backend 'objectstore'")

    def ensure_directory(self, path: Any) -> None:
        """Object stores have no folders; a prefix exists once an object is under it."""
        self.url(path)


@contextmanager
def _clear_errors(url: str, writing: bool = False) -> Iterator[None]:
    """Store failures as errors that name the URL and say what to do."""
    try:
        yield
    except (IsADirectoryError, NotADirectoryError):
        raise
    except FileNotFoundError as exc:
        if writing:
            raise FileNotFoundError(
                f"cannot write {url!r}: {exc}. Does the bucket exist? Create it first; "
                "nothing was written") from exc
        raise FileNotFoundError(f"nothing at {url!r} on backend 'objectstore': {exc}") from exc
    except PermissionError as exc:
        raise PermissionError(
            f"access to {url!r} was refused: {exc}. Check the credentials in the environment "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws) or storage_options"
        ) from exc
    except (OSError, TimeoutError) as exc:
        if isinstance(exc, TimeoutError) and not str(exc):
            exc = TimeoutError("no answer before the backend's timeout")
        raise _no_answer(url, exc, writing) from exc
    except Exception as exc:
        # botocore/aiohttp connection errors are not OSErrors
        name = type(exc).__name__
        if any(word in name for word in ("Connect", "Endpoint", "Timeout", "ClientOSError",
                                         "ServerDisconnected", "ReadTimeout")):
            raise _no_answer(url, exc, writing) from exc
        raise


def _no_answer(url: str, exc: BaseException, writing: bool) -> ConnectionError:
    """One wording for every lost connection; a failed write says that nothing landed."""
    return ConnectionError(
        f"the object store did not answer for {url!r}: {type(exc).__name__}: {exc}. Check "
        "the endpoint and the network, then retry" + ("; nothing was written" if writing
                                                       else ""))
