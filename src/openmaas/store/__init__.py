"""Storage: SQLAlchemy tables, Alembic migrations, and the SQL stores."""
