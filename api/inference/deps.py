"""What the routes need, built once by `create_app` and handed out through `Annotated` dependencies."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from api.inference.predictor import Predictor
from services.config import Settings
from services.errors import InvalidRequest, ObjectNotFound
from services.locations import check_location
from services.storage.object_store import ObjectStore, local_copy, make_s3_client, open_store
from services.storage.uri import S3URI, parse_uri


class ImageReader:
    """Reads images named by `s3://` or `file://` URIs, sharing one S3 client (slow to build, thread-safe)."""

    def __init__(self, settings: Settings, *, s3_client: Any | None = None) -> None:
        self.settings = settings
        self._s3_client = s3_client
        self._lock = threading.Lock()

    def client(self) -> Any:
        """The shared S3 client, built on first use."""
        with self._lock:
            if self._s3_client is None:
                self._s3_client = make_s3_client(self.settings.storage)
            return self._s3_client

    @property
    def local_files_allowed(self) -> bool:
        """Only the embedded mode serves local files: elsewhere a caller could read the server's disk."""
        return self.settings.environment == "embedded"

    def open(self, uri: str, *, create: bool = False) -> tuple[ObjectStore, str]:
        """The store holding `uri` and the key inside it."""
        parsed = parse_uri(uri)
        if not isinstance(parsed, S3URI) and not self.local_files_allowed:
            raise InvalidRequest("file:// image URLs are served only in the embedded mode; use s3://")
        client = self.client() if isinstance(parsed, S3URI) else None
        return open_store(parsed, self.settings, client=client, create=create)

    def read(self, uri: str) -> bytes:
        """A user-named image's bytes, at most the configured object size (ObjectTooLarge beyond).

        The artifacts store (every tenant's checkpoints and classifiers) cannot be named.
        """
        check_location(uri, "image_url", self.settings)
        store, key = self.open(uri)
        if not key:
            # A bucket root, a folder or a missing local file: no single object is named.
            raise ObjectNotFound(uri)
        return store.read_bytes(key, max_bytes=self.settings.limits.max_object_bytes)

    def model_file(self, location: str, folder: Path) -> str:
        """A local path for a model file: an `s3://` one is downloaded once into `folder`.

        Local paths and `file://` URIs are returned as they are; the routes accept them only in
        the embedded mode.
        """
        client = self.client() if location.startswith("s3://") else None
        return local_copy(location, folder, self.settings, client=client)


async def get_predictor(request: Request) -> Predictor:
    """The predictor the lifespan built."""
    predictor: Predictor = request.app.state.predictor
    return predictor


async def get_image_reader(request: Request) -> ImageReader:
    """The app's image reader."""
    reader: ImageReader = request.app.state.image_reader
    return reader


PredictorDep = Annotated[Predictor, Depends(get_predictor)]
ImageReaderDep = Annotated[ImageReader, Depends(get_image_reader)]
