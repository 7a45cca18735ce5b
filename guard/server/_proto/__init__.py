"""Generated protobuf / gRPC stubs; regenerate with ``python tools/gen_proto.py``."""
