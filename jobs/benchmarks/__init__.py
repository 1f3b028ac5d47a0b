"""Benchmark programs; each module exposes ``main(argv: list[str]) -> int`` and prints a table."""
