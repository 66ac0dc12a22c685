"""The encrypted diagnosis service: HTTP server (``server``), client SDK (``client``), key store and load test."""
