"""PostgreSQL from Trio: a connection on psycopg's libpq core, and a small pool of them.

@.architecture
role: PostgreSQL client package
jobs: [package_metadata]
"""
