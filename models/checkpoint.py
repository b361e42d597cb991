"""The error every adapter raises for weights it can't load."""


class CheckpointError(ValueError):
    """A checkpoint that can't be loaded into the model: the message says why."""
