"""Importable helpers shared by the tests (never a conftest, never another test module)."""
