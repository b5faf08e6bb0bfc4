"""xaid server: explanations of ONNX models over gRPC, on onnxruntime."""
