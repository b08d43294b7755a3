"""An aiohttp gateway that serves HPC-hosted models through the OpenAI API."""
