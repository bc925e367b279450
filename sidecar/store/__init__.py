"""Stores: memory, sqlite, redis behind one interface."""
