"""Recipes for the default ONNX models; build-time only (scikit-learn, skl2onnx)."""
