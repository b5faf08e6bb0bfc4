"""The Open Inference Protocol (KServe v2 / Triton gRPC) over the same core as xaid.v1."""
