"""Records and storage: request records and batches in SQLite or PostgreSQL, their schemas and
migrations, and the JSON lines on stdout. Below the request core, which hands records down."""
