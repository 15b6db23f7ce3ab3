"""PreflightService: deterministic governance with OPA/Rego policies and ONNX classifiers."""
