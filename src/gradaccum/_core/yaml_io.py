"""The YAML loader, at its place outside the core: ``gradaccum._yaml`` (the core reads no YAML;
importing this module imports PyYAML)."""

from .._yaml import YAMLError as YAMLError
from .._yaml import safe_load as safe_load
