"""The `loftune` command line (filled in by later modules)."""


def main() -> int:
    return 0
