"""The mesh's benchmarks behind ``exegpt bench``: each module exposes ``add_arguments(parser)`` and
``run(args) -> int`` and prints a table of ratios against a baseline run alongside."""
