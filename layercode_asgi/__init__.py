"""layercode-asgi: a pure-ASGI toolkit for LayerCode voice-agent backends.

The public API is re-exported here; each name lives in the module named after its concept.
"""

from .errors import ConfigurationError, LayercodeError
from .middleware import DEFAULT_MAX_BODY_SIZE, LayercodeSignature
from .signature import (
    DEFAULT_TOLERANCE,
    SIGNATURE_HEADER,
    SignatureErrorReason,
    SignatureVerificationError,
    sign,
    verify_signature,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_TOLERANCE",
    "SIGNATURE_HEADER",
    "ConfigurationError",
    "LayercodeError",
    "LayercodeSignature",
    "SignatureErrorReason",
    "SignatureVerificationError",
    "__version__",
    "sign",
    "verify_signature",
]
