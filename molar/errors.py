"""The one base class for errors caused by what a user gave us (params, data, paths, flags).

Stages print such an error as a short ``error: ...`` line and exit 2 (stages/common.py). Anything
else is a bug in our code and keeps its traceback. Each subclass lives beside the code that raises
it (ParamsError in config.py, BadInputError in data/schema.py, BackboneError in backbones/).
"""

from __future__ import annotations


class UserError(ValueError):
    """Input that cannot be used as given; the message names the file, line or key, and the fix."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder a stage reads is not there: a path the user gave, or the output of a stage that has not run."""
