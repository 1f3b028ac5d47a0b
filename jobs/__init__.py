"""Entry points for `ray job submit` and the `medpruner` command (evaluate, sweep, report,
benchmark)."""
