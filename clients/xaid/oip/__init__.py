"""Generated stubs of the Open Inference Protocol (`inference.GRPCInferenceService`).

They live in a descriptor pool of their own: tritonclient registers the same `inference.*` names
in the default pool, and one process may import both.
"""
