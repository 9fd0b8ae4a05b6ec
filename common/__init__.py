"""Shared floor of medvl: nothing here knows any one pipeline."""
