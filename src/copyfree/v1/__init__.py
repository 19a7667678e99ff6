"""Generated gRPC code for package copyfree.v1 (make protos). Never edit by hand."""
