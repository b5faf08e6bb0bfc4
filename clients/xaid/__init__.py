"""xaid client: predictions and explanations of ONNX models served by an xaid server.

    >>> import xaid
    >>> with xaid.Client("127.0.0.1:50051") as client:
    ...     explanation = client.explain("shapes", "cat.png", "occlusion", window=(8, 8))

Everything public is importable from here; the modules starting with an underscore are
internals that may change between releases.
"""

from importlib import metadata as _metadata

from xaid._client import DEFAULT_MAX_MESSAGE_LENGTH, DEFAULT_TARGET, AsyncClient, Client
from xaid._requests import ModelInput, Text, explain_methods
from xaid._results import (
    ClassScore,
    Explanation,
    Faithfulness,
    ImagePreprocessing,
    ModelInfo,
    Prediction,
    SegmentAttribution,
    Target,
    TensorSpec,
    Timing,
)
from xaid._tls import tls_credentials
from xaid.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    XaidError,
)

try:
    __version__ = _metadata.version("xaid")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "DEFAULT_MAX_MESSAGE_LENGTH",
    "DEFAULT_TARGET",
    "AsyncClient",
    "Cancelled",
    "ClassScore",
    "Client",
    "DeadlineExceeded",
    "Explanation",
    "FailedPrecondition",
    "Faithfulness",
    "ImagePreprocessing",
    "Internal",
    "InvalidArgument",
    "ModelInfo",
    "ModelInput",
    "NotFound",
    "PermissionDenied",
    "Prediction",
    "ResourceExhausted",
    "SegmentAttribution",
    "Target",
    "TensorSpec",
    "Text",
    "Timing",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "XaidError",
    "__version__",
    "explain_methods",
    "tls_credentials",
]
