"""The gRPC transport (KServe V2 / Triton ``inference.GRPCInferenceService``): the protocol's messages
(``inference.proto`` and its generated ``inference_pb2``) and the server (:mod:`service.grpc.server`)."""

__all__: list[str] = []
