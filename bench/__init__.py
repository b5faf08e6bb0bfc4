"""Benchmarks: xaid against plain onnxruntime (the floor) and Captum (the anchor), same run."""
