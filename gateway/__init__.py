"""The public API: HTTP/JSON and gRPC in front of the funnel."""
