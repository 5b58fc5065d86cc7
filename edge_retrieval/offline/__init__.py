"""Offline work on recordings: archive indexing and search, retrieval metrics, evaluation streams,
query by example. Every window is scored through ``edge_retrieval.pipeline``, as on the device."""
