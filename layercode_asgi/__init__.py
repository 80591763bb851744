"""layercode-asgi: a pure-ASGI toolkit for LayerCode voice-agent backends.

The public API is re-exported here; each name lives in the module named after its concept.
"""

from .agents import Agent, Data, Hangup, Reply, Tts, TurnContext, TurnEvent
from .conversation import HistoryMessage
from .errors import ConfigurationError, LayercodeError, ResponseError
from .events import (
    EVENT_TYPES,
    TURN_EVENT_TYPES,
    DataPayload,
    InvalidPayloadError,
    LayercodeEventType,
    MessagePayload,
    SessionEndPayload,
    SessionStartPayload,
    SessionUpdatePayload,
    TranscriptItem,
    TurnPayload,
    UnknownEventError,
    WebhookPayload,
    parse_webhook_payload,
)
from .middleware import DEFAULT_MAX_BODY_SIZE, LayercodeSignature
from .signature import (
    DEFAULT_TOLERANCE,
    SIGNATURE_HEADER,
    SignatureErrorReason,
    SignatureVerificationError,
    sign,
    verify_signature,
)
from .sse import SSE_HEADERS, EventStreamResponse, create_sse_response, format_sse_message
from .turns import Turn, TurnStatus, TurnStream, stream_response, stream_turn
from .webhook import LayercodeWebhook

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_TOLERANCE",
    "EVENT_TYPES",
    "SIGNATURE_HEADER",
    "SSE_HEADERS",
    "TURN_EVENT_TYPES",
    "Agent",
    "ConfigurationError",
    "Data",
    "DataPayload",
    "EventStreamResponse",
    "Hangup",
    "HistoryMessage",
    "InvalidPayloadError",
    "LayercodeError",
    "LayercodeEventType",
    "LayercodeSignature",
    "LayercodeWebhook",
    "MessagePayload",
    "Reply",
    "ResponseError",
    "SessionEndPayload",
    "SessionStartPayload",
    "SessionUpdatePayload",
    "SignatureErrorReason",
    "SignatureVerificationError",
    "TranscriptItem",
    "Tts",
    "Turn",
    "TurnContext",
    "TurnEvent",
    "TurnPayload",
    "TurnStatus",
    "TurnStream",
    "UnknownEventError",
    "WebhookPayload",
    "__version__",
    "create_sse_response",
    "format_sse_message",
    "parse_webhook_payload",
    "sign",
    "stream_response",
    "stream_turn",
    "verify_signature",
]
