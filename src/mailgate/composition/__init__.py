"""Composition: servers built from settings, with the built-in plugins they ask for.

The top of the library (below the command line): :mod:`.server` holds the
``mailgate.Server`` facade, :mod:`.builtins` the one place that knows every built-in
plugin. Nothing below imports this package.
"""
