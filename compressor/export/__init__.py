"""ONNX export with a numeric check, and INT8 quantization recipes (TensorRT is optional and lazy)."""
