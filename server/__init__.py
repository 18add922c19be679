"""The facegate gRPC server: servicers, pipelines, dynamic batching and the gallery."""
