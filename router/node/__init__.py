"""The site node: a gRPC server around the routing engine and its journal.

``server.build_node`` builds one; ``main.run_node`` is ``tandem node``.
"""
