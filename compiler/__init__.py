"""qcc: an ONNX quantization compiler for Qualcomm HTP-class NPUs."""
__version__ = "0.1.0"
