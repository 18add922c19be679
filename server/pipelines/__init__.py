"""Request pipelines: decode -> detect -> crop -> classify -> decide (liveness); clips (identification)."""
