"""Exception types of vllm-terratorch.

Each one subclasses the builtin a caller would already catch (`ValueError` for bad configuration
or data, `FileNotFoundError` for missing files), so generic handlers (vLLM's HTTP layer maps
`ValueError` to 400) keep working, and each message says what was wrong, where, and what to do.
"""

from __future__ import annotations


class TerratorchError(Exception):
    """Base class of every error raised by vllm-terratorch."""


class ConfigError(TerratorchError, ValueError):
    """`config.json` (or the `pretrained_cfg` inside it) is not a servable TerraTorch config."""


class ModelSourceError(TerratorchError, FileNotFoundError):
    """The model folder or Hugging Face repo (or a file it must contain) cannot be found."""


class WeightsError(TerratorchError, ValueError):
    """A checkpoint cannot be read, or its tensors do not match the model built from the config."""


class ModelBuildError(TerratorchError, ValueError):
    """TerraTorch could not build the task described by `pretrained_cfg.model`."""


class InputError(TerratorchError, ValueError):
    """A request's tensors do not match the model's input specification."""


class RequestError(TerratorchError, ValueError):
    """A serving request is malformed, too large, or names data we may not read (HTTP 400)."""


class SourceNotAllowedError(RequestError):
    """A request names a local path or URL outside what the server was allowed to read."""


class OutputPathError(RequestError):
    """A request's `out_path` names a place the server may not or cannot write a new file."""


class UsageError(TerratorchError, ValueError):
    """A command-line problem: a bad option or combination of options (exit code 2)."""


class OutputExistsError(TerratorchError, FileExistsError):
    """An output file or folder already exists and `--force` was not given."""
