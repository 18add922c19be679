"""Python client for facegate: ``FacegateClient`` (sync) with deadlines by default and retries on UNAVAILABLE."""

from facegate_client.client import FacegateClient, LivenessAnswer, RetryPolicy

__all__ = ["FacegateClient", "LivenessAnswer", "RetryPolicy"]
