"""Sessions: live sessions as metadata, and what operators do with them.

The registry of records and counters (``registry``), one process's sessions
as the Admin API queries them (``live``), and evictions at a rate
(``evict``).  Never a socket in a table: a session registers a handle.
"""
