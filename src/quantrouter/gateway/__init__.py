"""A quantization-aware Endpoint Picker for the Gateway API Inference Extension (`quantrouter epp`).

Envoy (or any conformant gateway) asks it over ext_proc where each HTTP inference request goes; it picks
the (node, variant) with the fleet's own choice and rewrites the request's model to that variant.
Needs the `gateway` extra (xds-protos).
"""
