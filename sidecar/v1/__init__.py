"""Generated protobuf and gRPC code for sidecar.v1 (make proto)."""
