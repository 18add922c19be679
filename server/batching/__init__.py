"""Dynamic batching with Triton's semantics, one batcher per model."""
