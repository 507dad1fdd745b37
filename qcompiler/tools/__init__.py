"""User tools on top of the backend: the CLI, evaluation, generation, benchmarks, reports, export."""
