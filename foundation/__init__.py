"""What every package of the zone stands on, and nothing else: the one exception tree
(``errors``), opening the state database (``sql``), the clock (``clock``) and the
environment that keeps the engines off the network (``engine_env``).

It sits at the bottom of the import graph: it imports nothing of ours, and every package
may import it. It reads no rows (that is ``connectors``' job alone).
"""
