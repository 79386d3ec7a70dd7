"""Python-version differences in one place: `tomllib` is in the standard library from Python 3.11; on 3.10
the `tomli` package (a dependency there) provides the same API."""

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # noqa: F401
