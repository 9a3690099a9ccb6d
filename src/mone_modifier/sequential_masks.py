"""Placeholder; replaced once the root cause is confirmed."""


def install():
    pass


def uninstall():
    pass
