"""Request dependencies as `Annotated` aliases; tests replace them with `app.dependency_overrides`.

Everything long-lived (settings, session factory, queue, store opener) is built once by
`create_app` and kept on `app.state`; these functions only hand it to the routes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from api.control.queue import JobQueue
from services.config import Settings
from services.storage.object_store import ObjectStore, make_s3_client, open_store
from services.storage.uri import S3URI, StorageURI, parse_uri


class StoreOpener:
    """Opens the store behind a URI, sharing one S3 client across requests.

    boto3 clients are thread-safe but slow to build (they load the service model), so the
    first S3 URI builds the client and later ones reuse it.
    https://boto3.amazonaws.com/v1/documentation/api/latest/guide/clients.html#multithreading-or-multiprocessing-with-clients
    """

    def __init__(self, settings: Settings, *, s3_client: Any | None = None) -> None:
        self.settings = settings
        self._s3_client = s3_client
        self._signer: Any | None = None
        self._lock = threading.Lock()

    def _client(self) -> Any:
        with self._lock:
            if self._s3_client is None:
                self._s3_client = make_s3_client(self.settings.storage)
            return self._s3_client

    def signing_client(self) -> Any | None:
        """The client that signs download URLs for `storage.s3_public_endpoint_url` (None: not set)."""
        public = self.settings.storage.s3_public_endpoint_url
        if public is None:
            return None
        with self._lock:
            if self._signer is None:
                storage = self.settings.storage.model_copy(update={"s3_endpoint_url": public})
                self._signer = make_s3_client(storage)
            return self._signer

    def __call__(self, uri: str | StorageURI, *, create: bool = False) -> tuple[ObjectStore, str]:
        """The store holding `uri` and the key (or key prefix) inside it, as `open_store` returns."""
        parsed = parse_uri(uri) if isinstance(uri, str) else uri
        client = self._client() if isinstance(parsed, S3URI) else None
        return open_store(parsed, self.settings, client=client, create=create)


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """One database session per request, closed when the response is done."""
    factory: sessionmaker[Session] = request.app.state.session_factory
    with factory() as session:
        yield session


def get_queue(request: Request) -> JobQueue:
    """The queue jobs are submitted to."""
    queue: JobQueue = request.app.state.queue
    return queue


def get_store_opener(request: Request) -> StoreOpener:
    """The app's store opener (datasets and artifacts)."""
    opener: StoreOpener = request.app.state.store_opener
    return opener


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
StoreOpenerDep = Annotated[StoreOpener, Depends(get_store_opener)]
