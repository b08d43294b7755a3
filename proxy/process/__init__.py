"""Process and wiring: the command line, worker processes, reloads, and the application built from
the settings. The top layer: it may import every other layer, and none imports it."""
