"""The HTTP edge: middleware and routes. It turns HTTP requests into calls on the request core and
the core's results and errors into HTTP answers; nothing below it sees an aiohttp route table."""
