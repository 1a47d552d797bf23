"""The state store: one protocol with etcd's data model, two backends (SQLite, etcd)."""
