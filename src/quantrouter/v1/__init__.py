"""Code generated from protos/quantrouter/v1 at install time (not edited by hand)."""
