"""onnxruntime sessions, the loaded-model handle and the one batched evaluation runner."""
