from qfv_brevitas.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
