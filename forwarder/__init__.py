"""Mail-forwarding daemon for graduates' school addresses."""

__version__ = "0.1.0"
