"""Interaction history in ClickHouse (DESIGN.md "History", invariant 5).

Modules: :mod:`schema` (tables, migrations), :mod:`store` (server and chdb backends),
:mod:`writer` (batched, spooling writer), :mod:`rows` (node views -> rows),
:mod:`kpi` and :mod:`chargeback` (reports), :mod:`recent` (repeat-caller / screen-pop
cache), :mod:`cli` (``tandem history`` and ``tandem report``). Nothing here imports chdb
or clickhouse-driver at import time.
"""
