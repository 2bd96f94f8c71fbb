"""Capacity planning (issue 12): how many calls come, and how many agents a queue needs,
interval by interval. ``forecast.py``: arrivals and handle times per queue and 15-minute
interval (seasonal naive, 4-week same-weekday average, a trend x weekday x intraday
decomposition that knows holidays, the intraday re-forecast; ``interval_counts`` from
history rows); ``synth.py``: the seeded synthetic history the backtest
(``bench/forecast.py``) runs on; ``staffing.py``: exact Erlang C and Erlang A staffing
with a square-root cross-check, occupancy cap and shrinkage (``tandem capacity staff``);
``plan.py``: a day's staffing table per queue from history rows (forecast, patience,
staffing per interval); ``history.py``: the query that reads those rows from the store
(``tandem capacity forecast``, ``cli.py``); ``simulate.py``: one queue played through the
real engine on simulated time (the what-if simulator's single-site path, every call's
wait recorded) and measured against exact Erlang A (``bench/simulate.py``). Pure but for
``history.py`` and ``cli.py``."""
