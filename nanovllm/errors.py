"""The errors nano-vLLM raises at its boundary, so callers can catch exactly what went wrong."""


class ModelFormatError(ValueError):
    """A model folder or checkpoint is missing a piece, or a piece is malformed."""


class UnsupportedArchitectureError(ModelFormatError):
    """The model's `architectures` entry is not one nano-vLLM implements."""


class PromptTooLongError(ValueError):
    """A prompt does not leave room for even one generated token inside the model's context."""
