"""The `copyfree` command line: train, export, serve, register, check, demo."""
