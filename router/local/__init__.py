"""Running Tandem's servers on this machine: a throw-away etcd (``etcd``), node
processes (``nodes``) and a ClickHouse server (``clickhouse``) on free loopback ports.
Used by the demo, the benchmarks and the tests; nothing here is imported by a node.
"""
