"""A cap on request body size, enforced while the body streams in (pure ASGI middleware).

A declared `Content-Length` over the limit is answered 413 before a byte of the body is read; a
chunked body is counted as it arrives and cut off, also with a 413, once it passes the limit
(the app is then told that the client disconnected, and its own answer is dropped).
So no request makes a service buffer or parse more than the limit (a 60 MB JSON body used to
be parsed in full).
"""

from __future__ import annotations

from http import HTTPStatus

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    """Answer 413 to any HTTP request whose body is over `max_bytes`; `setting` names the knob."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, setting: str) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.setting = setting

    def _too_large(self) -> JSONResponse:
        detail = (
            f"the request body is larger than this service accepts ({self.max_bytes} bytes, {self.setting})"
        )
        return JSONResponse(
            status_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            content={"detail": detail, "error": "RequestTooLarge"},
            headers={"Connection": "close"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large()(scope, receive, send)
            return
        if declared is not None:
            # The HTTP server reads exactly the declared length as this request's body (what
            # follows is the next request): nothing to count, so no wrappers on every message.
            await self.app(scope, receive, send)
            return
        await self._counted(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app on a body counted as it arrives; 413 once it passes the limit."""
        state = {"seen": 0, "started": False, "answered": False}

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] != "http.request" or state["answered"]:
                return message
            state["seen"] += len(message.get("body", b""))
            if state["seen"] <= self.max_bytes:
                return message
            # Answer now and tell the app the client is gone: whatever it was parsing stops there.
            if not state["started"]:
                await self._too_large()(scope, receive, send)
            state["answered"] = True
            return {"type": "http.disconnect"}

        async def guarded_send(message: Message) -> None:
            if state["answered"]:
                return  # the 413 is the answer; the app's own (an error about the cut body) is dropped
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not state["answered"]:
                raise
            # The app's complaint about the body that ended early; the client already has its 413.
