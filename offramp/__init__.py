"""The `offramp` command: one front door over the server, export and load-test packages."""

from server import __version__

__all__ = ["__version__"]
