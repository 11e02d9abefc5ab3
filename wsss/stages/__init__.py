"""Pipeline stages. Each module has a pure core function and a thin CLI entry point."""
