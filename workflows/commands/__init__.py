"""The ``wsi-mil`` subcommands, one module each (``add_parser`` + ``run``)."""

__all__: list[str] = []
