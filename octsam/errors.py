"""Errors a user can cause. The command lines print their message without a stack trace."""


class OctSamError(Exception):
    """A problem with the user's input (paths, data, config, adapter) with a message that names the fix."""
