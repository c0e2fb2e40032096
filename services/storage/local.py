"""An object store on a local folder (`file://` URIs), for the embedded mode and tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from services.errors import BucketNotFound, InvalidRequest, ObjectNotFound, ObjectTooLarge
from services.storage.base import ObjectInfo

# Temporary files of in-flight writes; hidden from listings so readers never see partial objects.
_TMP_PREFIX = ".must-tmp-"


def _check_key(key: str, *, allow_prefix: bool = False) -> list[str]:
    """Split a key into path parts, refusing anything that could leave the root (`..`, absolute)."""
    parts = key.split("/")
    if allow_prefix and parts[-1] == "":
        parts = parts[:-1]
    if key.startswith("/") or "\\" in key or any(p in {"", ".", ".."} for p in parts):
        raise InvalidRequest(f"invalid object key {key!r}: no '..', '.', empty or absolute parts")
    return parts


class LocalObjectStore:
    """An ObjectStore whose keys are files under `root`; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key))

    def uri(self, key: str) -> str:
        """The file:// URI of `key`."""
        return self._path(key).as_uri()

    def check_access(self) -> None:
        """BucketNotFound unless the root folder exists."""
        if not self.root.is_dir():
            raise BucketNotFound(str(self.root))

    def iter_keys(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Walk only the folder the prefix points into, one directory listing at a time."""
        self.check_access()
        folder = prefix.rpartition("/")[0]
        parts = _check_key(folder) if folder else []
        for key, size in self._walk(self.root.joinpath(*parts), f"{folder}/" if folder else ""):
            if key.startswith(prefix):
                yield ObjectInfo(key=key, size=size)

    def _walk(self, folder: Path, base: str) -> Iterator[tuple[str, int]]:
        """Yield (key, size) in S3's key order: a folder `a` sorts as `a/`. Folder links are not followed."""
        try:
            with os.scandir(folder) as it:
                entries = sorted(
                    it, key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name
                )
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if entry.name.startswith(_TMP_PREFIX):
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path), f"{base}{entry.name}/")
            elif entry.is_file():
                yield f"{base}{entry.name}", entry.stat().st_size

    def read_bytes(self, key: str, *, max_bytes: int) -> bytes:
        """Stat for the size first, then read at most `max_bytes + 1` bytes."""
        path = self._existing(key)
        size = path.stat().st_size
        if size > max_bytes:
            raise ObjectTooLarge(self.uri(key), max_bytes, size)
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ObjectTooLarge(self.uri(key), max_bytes)
        return data

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            self.check_access()
            raise ObjectNotFound(self.uri(key))
        return path

    def open_stream(self, key: str, *, chunk_bytes: int = 1 << 20) -> tuple[int, Iterator[bytes]]:
        """The file's size and a generator of its chunks (the file is opened now, read as it goes)."""
        fh = self._existing(key).open("rb")
        size = os.fstat(fh.fileno()).st_size

        def chunks() -> Iterator[bytes]:
            with fh:
                while chunk := fh.read(chunk_bytes):
                    yield chunk

        return size, chunks()

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write to a temporary file in the target folder, fsync, then rename over the target."""
        self._atomic_write(self._path(key), lambda fh: fh.write(data))

    def upload_file(self, key: str, path: Path) -> None:
        """Copy a local file into the store atomically."""
        with Path(path).open("rb") as src:
            self._atomic_write(self._path(key), lambda fh: shutil.copyfileobj(src, fh))

    def download_file(self, key: str, path: Path) -> None:
        """Copy an object out of the store atomically."""
        source = self._existing(key)
        with source.open("rb") as src:
            self._atomic_write(Path(path), lambda fh: shutil.copyfileobj(src, fh))

    @staticmethod
    def _atomic_write(target: Path, fill: Callable[[IO[bytes]], object]) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_TMP_PREFIX)
        try:
            # mkstemp creates 0600 files; other processes (inference, another user) must read them.
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as fh:
                fill(fh)
                fh.flush()
                os.fsync(fh.fileno())
            # os.replace is atomic within one filesystem: readers see the old or the new file.
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        """Whether a file has this key."""
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> int:
        """Delete the files under a non-empty prefix and the folders this leaves empty."""
        if not prefix:
            raise InvalidRequest("refusing to delete a whole store: give a non-empty prefix")
        deleted = 0
        for info in self.iter_keys(prefix):
            path = self._path(info.key)
            path.unlink(missing_ok=True)
            self._prune(path.parent)
            deleted += 1
        return deleted

    def delete_keys(self, keys: list[str]) -> None:
        """Delete these files (a missing one is skipped) and the folders this leaves empty."""
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            self._prune(path.parent)

    def _prune(self, folder: Path) -> None:
        """Remove empty folders upward, stopping at the root or the first non-empty one."""
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent
