"""garden: reproducible studies of language-model training dynamics over checkpoint series."""

__version__ = "0.1.0"
