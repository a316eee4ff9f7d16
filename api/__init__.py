"""capkv\x27s HTTP layer: the aiohttp app, routes, errors, the Python client and the CLI."""
