"""Errors meant for people.

Every error a user can cause is a `DifflabError`: its message is one line that says what was wrong
and what to do about it. The CLI prints it without a traceback and exits with status 2.
"""


class DifflabError(Exception):
    """Bad input or a failed precondition the user can fix."""


class ConfigError(DifflabError):
    """An unknown option value, a malformed config file, conflicting settings."""


class DataError(DifflabError):
    """A data spec that cannot be opened, or data that cannot be used as asked."""


class ModelError(DifflabError):
    """A model folder or preset that cannot be built, loaded or used as asked."""


class RunFolderError(DifflabError):
    """A run folder that would be overwritten, or cannot be resumed."""


class TrainingError(DifflabError):
    """Training cannot go on (a non-finite loss, a failed write); the last checkpoint stays usable."""


class GuidanceError(DifflabError):
    """A guidance term that cannot be built or used as asked (unknown term, bad colour, no CLIP model)."""


class InputError(DifflabError):
    """A generation input that cannot be used as asked (an unreadable image, a mask that does not fit,
    a prompt for a model without a text encoder)."""
class OutputError(DifflabError):
    """An output path (--out, --out-dir, --json, --export) that cannot be written; found before any work."""
