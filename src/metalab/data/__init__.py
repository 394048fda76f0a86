"""Omniglot data: download, prefetch, splits and episode sampling."""
