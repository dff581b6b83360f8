"""pgbridge: a production-grade self-hosted PostgreSQL with CDC into an analytics warehouse."""

__version__ = "0.1.0"
