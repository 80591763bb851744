"""layercode-asgi: a pure-ASGI toolkit for LayerCode voice-agent backends.

The public API is re-exported here; each name lives in the module named after its concept.

One webhook request, from ``create_app`` to the last byte:

1. ``server.create_app`` builds a Starlette app (an error it answered 500 stays in it);
   the webhook route's endpoint is ``lifecycle.WebhookEndpoint.__call__``: refuses new
   webhooks while draining (503), counts the request in ``Lifecycle.active`` for the drain.
2. ``middleware.LayercodeSignature.verified_body``: the signature header, then the body
   (``_asgi.read_body``, bounded in size and time), the HMAC (``signature.verify_signature``)
   and replay protection; a failed check is answered with ``_asgi.send_json_error``.
3. ``webhook.LayercodeWebhook.answer`` → ``_respond``: ``events.parse_webhook_payload``;
   ``data`` / ``session.update`` / ``session.end`` get JSON (``_answer_json``); a turn gets
   ``turn_response``, an ``sse.EventStreamResponse`` whose producer (``webhook._TurnRequest``)
   queues for the conversation's lock (``conversations.lock``), reads the history, runs the
   turn (``_start_turn``, ``Turn.run``) and records it (``record``, just before ``response.end``).
4. ``turns.Turn.run``: the deadline (armed when the lock was taken) covers ``_produce`` (the
   agent's replies, ``deliver`` → ``emit``) and ``end``; past it, the fallback or
   ``response.error`` and ``response.end`` get the grace.
5. ``sse.EventStreamResponse.__call__``: runs the producer in the request's own task, a
   disconnect watcher in another; ``emit`` sends each chunk (back-pressure), ``_finish`` the
   final frame.
"""

from ._version import __version__
from .agents import (
    Agent,
    AgentFactory,
    AgentNotFoundError,
    Data,
    Hangup,
    Reply,
    Tts,
    TurnContext,
    TurnEvent,
    echo_agent,
    get_agent,
    list_agents,
    openai_agent,
    register_agent,
)
from .config import Settings, SettingsError
from .conversation import (
    ConversationBackend,
    ConversationLockTimeout,
    ConversationManager,
    ConversationStore,
    HistoryMessage,
    MemoryConversationStore,
    RedisConversationStore,
    Role,
    StoreError,
    StoreUnavailableError,
)
from .errors import ConfigurationError, LayercodeError, ResponseError
from .events import (
    EVENT_TYPES,
    DataPayload,
    InvalidPayloadError,
    LayercodeEventType,
    MessagePayload,
    SessionEndPayload,
    SessionStartPayload,
    SessionUpdatePayload,
    TranscriptItem,
    UnknownEventError,
    WebhookPayload,
    parse_webhook_payload,
)
from .logs import setup_logging
from .metrics import MemoryMetrics, MetricsSink, TurnMetrics, WebhookRecord
from .middleware import DEFAULT_MAX_BODY_SIZE, LayercodeSignature
from .replay import MemoryReplayCache, RedisReplayCache, ReplayCache
from .server import AuthorizeGuard, LayercodeApp, Lifecycle, create_app, run_server
from .signature import (
    DEFAULT_TOLERANCE,
    SIGNATURE_HEADER,
    SignatureErrorReason,
    SignatureVerificationError,
    sign,
    verify_signature,
)
from .sse import SSE_HEADERS, Emit, EventStreamResponse, create_sse_response, format_sse_message
from .turns import StreamHandler, Turn, TurnStatus, TurnStream, stream_response, stream_turn
from .webhook import LayercodeWebhook

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_TOLERANCE",
    "EVENT_TYPES",
    "SIGNATURE_HEADER",
    "SSE_HEADERS",
    "Agent",
    "AgentFactory",
    "AgentNotFoundError",
    "AuthorizeGuard",
    "ConfigurationError",
    "ConversationBackend",
    "ConversationLockTimeout",
    "ConversationManager",
    "ConversationStore",
    "Data",
    "DataPayload",
    "Emit",
    "EventStreamResponse",
    "Hangup",
    "HistoryMessage",
    "InvalidPayloadError",
    "LayercodeApp",
    "LayercodeError",
    "LayercodeEventType",
    "LayercodeSignature",
    "LayercodeWebhook",
    "Lifecycle",
    "MemoryConversationStore",
    "MemoryMetrics",
    "MemoryReplayCache",
    "MessagePayload",
    "MetricsSink",
    "RedisConversationStore",
    "RedisReplayCache",
    "ReplayCache",
    "Reply",
    "ResponseError",
    "Role",
    "SessionEndPayload",
    "SessionStartPayload",
    "SessionUpdatePayload",
    "Settings",
    "SettingsError",
    "SignatureErrorReason",
    "SignatureVerificationError",
    "StoreError",
    "StoreUnavailableError",
    "StreamHandler",
    "TranscriptItem",
    "Tts",
    "Turn",
    "TurnContext",
    "TurnEvent",
    "TurnMetrics",
    "TurnStatus",
    "TurnStream",
    "UnknownEventError",
    "WebhookPayload",
    "WebhookRecord",
    "__version__",
    "create_app",
    "create_sse_response",
    "echo_agent",
    "format_sse_message",
    "get_agent",
    "list_agents",
    "openai_agent",
    "parse_webhook_payload",
    "register_agent",
    "run_server",
    "setup_logging",
    "sign",
    "stream_response",
    "stream_turn",
    "verify_signature",
]
