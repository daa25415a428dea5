"""The scheduler service: one aiohttp process per GPU box."""
