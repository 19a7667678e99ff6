"""gRPC plumbing shared by the encoder, index and gateway services."""

from typing import Any

import grpc

ServicerContext = grpc.aio.ServicerContext[Any, Any]
