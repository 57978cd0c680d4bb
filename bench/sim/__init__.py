"""A discrete-event simulation of Ollama on GPUs, driving the real `quantrouter.policy` and `throughput` code.

Modules, lowest first: `hardware` (GPUs, model ladders, the true speed model), `workload` (request traces,
other tenants' memory), `engine` (Ollama's scheduler and the router loop), `policies` (quantrouter and the
baselines), `report` (tables and plots).
"""
