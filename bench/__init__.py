"""gproxy's benchmark harness: gproxy vs HAProxy, nginx stream and no proxy (see README.md)."""
