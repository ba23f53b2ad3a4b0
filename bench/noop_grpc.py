"""A no-op KServe v2 gRPC server: grpc.aio on uvloop, as the service runs it, whose ModelInfer
answers every request with zeros of the response's size and nothing else.

    python bench/noop_grpc.py PORT DIM

``bench/grpc_cpu.py`` runs it next to the service, so grpcio's own CPU per unary call (HTTP/2,
the completion queue, its threads' hand-offs, the asyncio glue) is measured in the same run:
the floor under any Python gRPC service on the machine.  The answer for a request of a given
length is built once (parsing that first request), then returned as it is.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
import numpy as np
import uvloop
from tritonclient.grpc import service_pb2 as pb


def main() -> None:
    port, dim = int(sys.argv[1]), int(sys.argv[2])
    answers: dict[int, bytes] = {}  # request length -> the answer

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        answer = answers.get(len(request))
        if answer is None:
            parsed = pb.ModelInferRequest.FromString(request)
            n = int(np.prod(parsed.inputs[0].shape))
            response = pb.ModelInferResponse(model_name=parsed.model_name, model_version="1")
            response.outputs.add(name="embeddings", datatype="FP32", shape=[n, dim])
            response.raw_output_contents.append(bytes(4 * n * dim))
            answer = answers[len(request)] = response.SerializeToString()
        return answer

    async def serve() -> None:
        server = grpc.aio.server()
        handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
