"""layercode-asgi: a pure-ASGI toolkit for LayerCode voice-agent backends.

The public API is re-exported here; each name lives in the module named after its concept.

One webhook request, from ``create_app`` to the last byte (docs/development.md walks it
step by step, with every early answer):

1. ``server.create_app`` builds a ``LayercodeApp`` (Starlette); its router hands a POST on
   the webhook route to ``lifecycle.WebhookEndpoint.__call__``: 503 while draining, else the
   request is counted in ``Lifecycle.active`` (for the drain) until it ends.
2. ``middleware.LayercodeSignature.verified_body``: what the headers decide (400, 413, 401)
   before any byte is read, then the body (``_asgi.read_body``: 413, 408), the HMAC
   (``signature.verify_signature``: 401) and replay protection (409, 503); it answers a
   refusal itself, else returns the body.
3. ``webhook.LayercodeWebhook.answer`` -> ``_respond``: ``events.parse_webhook_payload``
   (400, 415; an unknown type: 200 ignored); ``data`` / ``session.update`` /
   ``session.end`` get JSON (``_answer_json``); a turn gets ``turn_response``, an
   ``sse.EventStreamResponse`` whose producer is a ``webhook._TurnProducer``, and ``answer``
   calls it.
4. ``sse.EventStreamResponse.__call__`` runs the producer in the request's own task
   (``_run_producer``) and a disconnect watcher in another.
5. ``webhook._TurnProducer.__call__`` queues for the conversation's lock
   (``conversation.ConversationManager.lock``; 503 when too many wait or the wait is too
   long), reads the history (``conversation.manager.read_for_turn``), has
   ``LayercodeWebhook._start_turn`` build the ``turns.Turn`` and runs it.
6. ``turns.Turn.run``: the deadline (counted from the lock) covers ``_run_agent`` (the agent's
   replies, ``deliver`` -> ``sse.EventStreamResponse.emit``) and ``end``; past it, the
   fallback or ``response.error`` and ``response.end`` get the grace.
7. ``turns.Turn.end`` records the turn (``before_end``:
   ``webhook._TurnProducer.record_history`` -> ``conversation.manager.record_for_turn``;
   the built-in stores release the lock in that call), then sends ``response.end`` as the
   body's last chunk;
   ``sse.EventStreamResponse._finish`` sends what is left (before any event: a JSON error)
   and ``answer`` logs the request (``logs.log_webhook``).
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
from .webhook import EventHook, LayercodeWebhook

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
    "EventHook",
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
