"""Transport-agnostic services: the rules of each API, over pipelines and stores (no grpc here)."""
