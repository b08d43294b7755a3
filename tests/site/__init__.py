"""A site of the existing gateway, as it moves: its fixtures and its own adaptors."""
