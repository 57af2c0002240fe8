"""User-facing errors. A traceback means a bug in localtune; these mean bad input."""
from __future__ import annotations

import click


class LocaltuneError(click.ClickException):
    """Bad input or environment: message says where, what, and the fix."""

    exit_code = 1


class RecipeError(LocaltuneError):
    exit_code = 2


class DataError(LocaltuneError):
    exit_code = 2


class ModelError(LocaltuneError):
    exit_code = 1


class TrainingError(LocaltuneError):
    """The run stopped (NaN loss, full disk); the last good checkpoint is kept."""

    exit_code = 1
