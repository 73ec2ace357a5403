"""The command-line commands, one module each: parse arguments, call the library, print.

Each module has ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status); ``segkit.cli``
imports only the one that is asked for.
"""
