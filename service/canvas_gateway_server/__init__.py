"""canvas-gateway: a gRPC front door for Braze's POST /canvas/trigger/send.

Data flows one way, and the module names follow it:

    servicer (gRPC edge) -> convert (proto -> Braze JSON) -> validate -> tenants
    -> batching (<= 50 recipients, <= 4 MB) -> limits / retry -> upstream (REST)
    -> results (HTTP -> outcome) -> servicer

`app` is the one place that builds and wires the objects, `serve` runs them as a
process; `__main__` only reads settings and calls it.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
