"""One exception type for every input a user can get wrong, so the CLI can print it cleanly."""


class GardenError(Exception):
    """Bad input or a broken checkpoint: the message says what is wrong and what is valid."""
