"""Bots: echo, script, http, botpress behind one interface."""
