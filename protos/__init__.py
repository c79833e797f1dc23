"""protos: the wire contract between islands and the coordinator.

It owns `archipelago.proto` (services and messages), the generated gRPC stubs, and the payload
codec: named tensors quantized by a named scheme with error feedback, a msgpack header, a
zstd-compressed body split into checksummed chunks of bounded size.
"""
