"""Sessions: clients of the engine core that keep a conversation (multi-turn, live)."""
