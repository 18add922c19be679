"""Thin gRPC adapters: proto <-> domain objects. The only package that imports grpc and the stubs."""
